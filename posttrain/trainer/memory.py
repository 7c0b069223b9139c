"""Memory and speed knobs of the policy update: parameter storage dtype, FSDP sharding (with
optional CPU offload), compiled decoder layers and a compiled loss. Activation checkpointing is model.gradient_checkpointing (applied
when the model loads, posttrain/models/loading.py); fused AdamW is in optim.py."""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.distributed import is_distributed, shard_model
from posttrain.distributed.fsdp import decoder_layers

_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn``, made once per function (dynamic shapes: response lengths vary)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def prepare_for_training(
    model: torch.nn.Module, trainer_cfg, device: torch.device, compute_dtype: torch.dtype
) -> torch.nn.Module:
    """Store parameters in ``trainer.param_dtype`` and, on several ranks, shard the model with FSDP2
    (each decoder layer, then the root). Call before the optimizer is built: it must see the shards.
    Also for the frozen reference (or a critic), so that it is sharded the same way."""
    if trainer_cfg.param_dtype == "bfloat16":
        model.to(torch.bfloat16)
    if trainer_cfg.compile_layers and device.type == "cuda":
        # Regional compilation: one graph for all layers (same code, same shapes), compiled in seconds;
        # dynamic, since every packed micro-batch has another token count. Layers only: masks, the
        # loss and the chunked LM head stay outside. The engine runs the layers' sub-modules, not the
        # compiled forward, so generation is unaffected.
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    if is_distributed():
        shard_model(model, device, compute_dtype=compute_dtype, cpu_offload=trainer_cfg.fsdp_cpu_offload)
    return model
