"""Memory and speed knobs of the policy update: parameter storage dtype, FSDP sharding (with
optional CPU offload), compiled decoder layers and a compiled loss. Activation checkpointing is model.gradient_checkpointing (applied
when the model loads, posttrain/models/loading.py); fused AdamW is in optim.py."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from posttrain.distributed import is_distributed, shard_model
from posttrain.distributed.fsdp import decoder_layers
from posttrain.errors import ConfigError
from posttrain.models.moe.ep_training import apply_expert_parallel

logger = logging.getLogger("posttrain.trainer")

_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn``, made once per function (dynamic shapes: response lengths vary)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def prepare_for_training(
    model: torch.nn.Module, trainer_cfg, device: torch.device, compute_dtype: torch.dtype, moe=None
) -> torch.nn.Module:
    """Store parameters in ``trainer.param_dtype`` and, on several ranks, shard the model with FSDP2
    (each decoder layer, then the root). Call before the optimizer is built: it must see the shards.
    Also for the frozen reference (or a critic), so that it is sharded the same way. ``moe``: the
    run's ``moe`` section; on several ranks its ``ep_mode`` puts an MoE model's experts on expert
    parallelism before sharding (posttrain/models/moe/ep_training.py)."""
    master_weights = getattr(trainer_cfg, "master_weights", False)
    if master_weights and is_distributed():
        # The config check names this too; here for callers that build the trainer themselves.
        raise ConfigError("trainer.master_weights=true is not supported with FSDP (several processes); use "
                          "trainer.param_dtype=float32 trainer.master_weights=false: FSDP then keeps float32 shards "
                          "and runs bf16 all-gathers and compute.")
    if trainer_cfg.param_dtype == "bfloat16":
        model.to(torch.bfloat16)
        if not master_weights:  # with masters, the optimizer's float32 copies keep the small updates
            _warn_if_updates_round_away(model, trainer_cfg.lr)
    if trainer_cfg.compile_layers and device.type == "cuda":
        # Regional compilation: one graph for all layers (same code, same shapes), compiled in seconds;
        # dynamic, since every packed micro-batch has another token count. Layers only: masks, the
        # loss and the chunked LM head stay outside. The engine runs the layers' sub-modules, not the
        # compiled forward, so generation is unaffected.
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    if is_distributed() and moe is not None:
        apply_expert_parallel(model, moe.ep_mode, device)
    if is_distributed():
        shard_model(model, device, compute_dtype=compute_dtype, cpu_offload=trainer_cfg.fsdp_cpu_offload)
    return model


def _warn_if_updates_round_away(model: torch.nn.Module, lr: float) -> None:
    """An AdamW step moves a weight by about ``lr``; a bf16 weight ``w`` only changes when the step
    exceeds half its spacing, about ``|w| * 2**-8``. Warns with the share of trained weights that
    stay where they are. On SmolLM2 at the default lr 2e-5 that was most of them: GRPO accuracy
    stayed near 14% over 30 steps with bf16 parameters and reached 41% by step 8 with float32 ones."""
    trained = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in trained)
    if not total:
        return
    with torch.no_grad():
        frozen = sum(int((p.detach().abs().float() * 2.0**-8 > lr).sum()) for p in trained)
    if frozen / total > 0.1:
        logger.warning(
            "trainer.param_dtype=bfloat16: at trainer.lr=%g an AdamW step is smaller than half the bf16 "
            "spacing of %.0f%% of the weights, so those weights never change and learning stalls. Use "
            "trainer.master_weights=true (float32 master weights inside the optimizer), trainer.param_dtype=float32 "
            "(the default: bf16 compute under autocast), or a learning rate of at least %.1e, where half of them "
            "move.", lr, 100 * frozen / total,
            _median_abs(trained) * 2.0**-8,
        )


def _median_abs(params: list[torch.Tensor]) -> float:
    sample = torch.cat([p.detach().reshape(-1)[:: max(1, p.numel() // 4096)].abs().float() for p in params])
    return float(sample.median())
