"""``posttrain merge``: fold a LoRA adapter checkpoint into its base model and save a full
Hugging Face folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from posttrain.checkpoint.validate import validate_model_folder
from posttrain.config.schema import LoRAConfig, ModelConfig
from posttrain.errors import PosttrainError
from posttrain.models.loading import load_model_and_tokenizer, load_tokenizer, resolve_device
from posttrain.models.lora import ADAPTER_CONFIG_FILE, is_adapter_checkpoint, load_adapter

logger = logging.getLogger("posttrain.models")


def run_model_config(checkpoint: str | Path) -> ModelConfig | None:
    """The ``model`` section of the run that wrote ``checkpoint`` (<run>/checkpoints/<ckpt>), if any."""
    config_file = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not config_file.is_file():
        return None

    try:
        section = OmegaConf.load(config_file).get("model")
        if section is None:
            return None
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))  # type: ignore[return-value]
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        raise PosttrainError(f"Cannot read the model section of {config_file} ({exc}); pass --model-path.") from exc


def merge_adapter_checkpoint(checkpoint: str | Path, output_dir: str | Path, model_path: str | None = None,
                             device: str = "cpu") -> Path:
    """Load base + adapter, fold the adapter into the base weights, save a full Hugging Face folder.

    The base is ``model_path`` when given, else the ``model`` section of the run's config.yaml
    (so embedded, GGUF and hub bases work), else the adapter's own ``base_model_name_or_path``."""
    checkpoint = Path(checkpoint)
    if not is_adapter_checkpoint(checkpoint):
        raise PosttrainError(
            f"'{checkpoint}' is not a LoRA adapter checkpoint ({ADAPTER_CONFIG_FILE} is missing). Pass an "
            "adapter folder such as runs/NAME/checkpoints/adapter_step_000050."
        )
    validate_model_folder(checkpoint, "a LoRA adapter checkpoint")  # a cut-off adapter file: named, not a traceback
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise PosttrainError(f"--output '{output_dir}' exists and is not empty; choose a new folder.")
    run_cfg = None if model_path else run_model_config(checkpoint)
    cfg = run_cfg or ModelConfig()
    if model_path:
        cfg.path, cfg.gguf_file = model_path, ""
    elif run_cfg is None:
        base = json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text()).get("base_model_name_or_path")
        if not base:
            raise PosttrainError(f"No run config.yaml next to '{checkpoint}' and no base model recorded in the "
                                 "adapter: pass --model-path.")
        cfg.path = base
    cfg.gradient_checkpointing = False  # it would save use_cache=false into the merged config
    cfg.lora = LoRAConfig()  # load the plain base; the adapter comes from the checkpoint
    model, _ = load_model_and_tokenizer(cfg, resolve_device(device))
    peft_model = load_adapter(model, checkpoint, trainable=False)
    merged = peft_model.merge_and_unload()
    # The checkpoint's tokenizer is the one the adapter trained with (same as the base's).
    tokenizer = load_tokenizer(str(checkpoint), cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("Merged %s into %s: %s", checkpoint, cfg.path, output_dir)
    return output_dir
