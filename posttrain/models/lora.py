"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) through peft: wrap, disable, load, merge.

With ``model.lora.r > 0`` the base weights are frozen and only low-rank adapters train. The base
model then doubles as the frozen reference (adapters disabled), checkpoints hold the adapter
only, and ``posttrain merge`` folds an adapter into its base for a plain Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from posttrain.checkpoint.manager import ADAPTER_STEP_PREFIX, STEP_PREFIX
from posttrain.config.schema import LoRAConfig, ModelConfig
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.models")

ADAPTER_CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"


def lora_enabled(cfg: ModelConfig) -> bool:
    return cfg.lora.r > 0


def is_adapter_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a peft adapter (adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def is_peft_model(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last name parts of the model's linear layers (what target_modules names), sorted."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and name})


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    if targets == [ALL_LINEAR]:
        return
    names = [name for name, _ in model.named_modules()]
    # peft matches a target against a module name or its dotted suffix ("q_proj", "self_attn.q_proj").
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise PosttrainError(
            f"model.lora.target_modules names modules this model does not have: {', '.join(missing)}. "
            f"Its linear layers are: {', '.join(linear_module_names(model))} "
            f"(or use model.lora.target_modules=[{ALL_LINEAR}])."
        )


def _prepare_base(model: torch.nn.Module) -> None:
    # With a frozen base, the embedding output does not require grad; gradient checkpointing then
    # has nothing to backpropagate through unless the inputs are marked as requiring it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x renames it is_activation_checkpointing
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()


def apply_lora(model: torch.nn.Module, lora_cfg: LoRAConfig) -> torch.nn.Module:
    """Wrap ``model`` in fresh LoRA adapters (B = 0, so it computes exactly what it did before);
    freezes every base parameter. Returns the peft model (it holds ``model``'s modules, no copy)."""
    targets = list(lora_cfg.target_modules)
    _check_targets(model, targets)
    _prepare_base(model)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft probes deprecated transformers attributes
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d alpha=%g on %s: %d of %d parameters train (%.2f%%)", lora_cfg.r, lora_cfg.alpha,
                ", ".join(targets), trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = True) -> torch.nn.Module:
    """Wrap the base ``model`` with the adapter saved in ``adapter_dir`` (trainable for resume)."""
    _prepare_base(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise PosttrainError(
                f"Could not load the LoRA adapter in '{adapter_dir}' onto model.path ({exc}). The base model "
                "must be the one the adapter was trained on."
            ) from exc


def hot_swap_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> tuple[torch.nn.Module, bool]:
    """Apply the peft adapter saved in ``adapter_dir`` to a served model without a restart.

    The first call wraps ``model`` in the adapter (peft injects its layers into the model's own
    modules) and returns the wrapper, with True: modules changed. Later calls overwrite the adapter
    weights in place and return ``model`` with False."""
    if not is_peft_model(model):
        wrapped = load_adapter(model, adapter_dir, trainable=False)
        wrapped.eval()
        return wrapped, True
    device = next(model.parameters()).device
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise PosttrainError(f"The adapter in {adapter_dir} does not fit the loaded one: unexpected weights "
                             f"{result.unexpected_keys[:3]}; restart the server to change the adapter's shape.")
    return model, False


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base: adapters off, eval mode (no dropout). A no-op wrapper for
    models without adapters. This is the LoRA reference model: no second copy of the weights."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def checkpoint_prefix(model: torch.nn.Module) -> str:
    """Checkpoint folder prefix for ``model``: ``adapter_step`` for a LoRA (peft) model, else ``step``."""
    return ADAPTER_STEP_PREFIX if is_peft_model(model) else STEP_PREFIX
