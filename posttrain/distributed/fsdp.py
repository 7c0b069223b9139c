"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the policy, reference and critic models, and
the ways full weights leave a sharded model: gathered per bucket for a rollout engine, or all at
once, transiently, for generating with the training modules themselves.

Each rank holds ``1/world_size`` of every parameter (a ``DTensor`` sharded on dim 0). A decoder
layer's parameters are all-gathered just before its forward and freed after it, so the full model
never exists at once during training; gradients are reduce-scattered back to the shards."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from posttrain.distributed.process_group import all_reduce_sum, get_world_size
from posttrain.errors import PosttrainError

DEFAULT_BUCKET_BYTES = 256 * 2**20


def expert_parallel_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules on expert parallelism (``moe.ep_mode``): those carrying an
    ``expert_parallel`` state (posttrain.models.moe.ep_training.ExpertParallel)."""
    return [m for m in model.modules() if getattr(m, "expert_parallel", None) is not None]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (``_no_split_modules``: e.g. LlamaDecoderLayer),
    also under a peft wrapper or a value-head model. Each becomes its own FSDP unit."""
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in block_names]
    if not layers:  # not a transformers model: the longest ModuleList is the stack of blocks
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise PosttrainError(f"Cannot find the decoder layers of {type(model).__name__} to shard with FSDP.")
    return layers


def shard_model(
    model: nn.Module,
    device: torch.device,
    *,
    compute_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard ``model`` in place over all ranks: each decoder layer, then the root (embeddings,
    final norm, LM head). Returns the same module, now an ``FSDPModule``.

    ``compute_dtype`` lower than the parameters' dtype all-gathers parameters in that dtype (half
    the traffic) while the float32 shards stay the master weights the optimizer updates; gradients
    are reduced in float32. ``cpu_offload`` keeps parameter shards, gradients and optimizer states
    in CPU memory and copies each layer to the GPU for its compute (slower, much less GPU memory).
    """
    mesh = init_device_mesh(device.type, (get_world_size(),))
    param_dtype = next(model.parameters()).dtype
    mp_policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype if compute_dtype != param_dtype else None,
        reduce_dtype=torch.float32 if compute_dtype != param_dtype else None,
    )
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # Layers reshard after forward (free the gathered weights until backward); the root keeps its
    # (embedding, head) gathered, since backward starts with them at once.
    reshard = {}
    # Expert-parallel experts (moe.ep_mode, models/moe/ep_training.py): FSDP2 over the ranks holding
    # the same experts only (their forward scales the gradients so that FSDP2's mean over these
    # ranks is the mean over all).
    for experts in expert_parallel_modules(model):
        fully_shard(experts, mesh=experts.expert_parallel.fsdp_mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=True)
        reshard[experts] = True
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=True)
        reshard[layer] = True
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=False)
    reshard[model] = False
    model._posttrain_reshard_after_forward = reshard  # restored by gathered_for_generation
    model.run_as_forward = types.MethodType(_run_as_forward, model)
    register_fsdp_forward_method(model, "run_as_forward")
    return model


def _run_as_forward(self: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def forward_through_root(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as if it were ``model``'s forward: for code that calls the backbone
    and reads the LM head's weight itself (chunked logprobs) instead of calling ``model(...)``. On a
    sharded model the root's parameters (embeddings, norm, head) are gathered for it and its gradients
    reduced after backward, as for ``forward``; otherwise a plain call."""
    runner = getattr(model, "run_as_forward", None)
    return runner(fn, *args, **kwargs) if runner is not None else fn(*args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """All parameters of a sharded ``model`` gathered for the duration of the block, so that it can
    run any number of forward passes *without collectives*: ranks generate different numbers of
    tokens, and a rank may generate alone (validation on rank 0). Every rank must enter and leave
    the block together (entering is one all-gather per FSDP unit). Costs a full unsharded copy of
    the model per rank while inside. A no-op for an unsharded model."""
    reshard = getattr(model, "_posttrain_reshard_after_forward", None)
    if not reshard:
        yield
        return
    for module in reshard:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    # transformers' generate sees an FSDP-managed model and keeps every rank stepping until all have
    # finished (synced_gpus: an all-reduce per token); with gathered weights no rank needs the others.
    model._is_fsdp_managed_module = False
    experts = expert_parallel_modules(model)
    for module in experts:  # full experts on every rank: no all-to-all while generating
        module.expert_parallel.gather(module)
    try:
        yield
    finally:
        for module in experts:
            module.expert_parallel.release()
        model._is_fsdp_managed_module = True
        for module, value in reshard.items():
            module.reshard()
            module.set_reshard_after_forward(value, recurse=False)


def full_tensor(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor; a collective for DTensors, so every rank must call
    it. CPU-offloaded shards are gathered on ``device`` (NCCL cannot gather CPU tensors)."""
    if not isinstance(tensor, DTensor):
        return tensor.detach()
    if device is not None and tensor.device != device:
        tensor = DTensor.from_local(
            tensor.to_local().to(device), tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
        )
    return tensor.detach().full_tensor()


def iter_full_weights(
    model: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: torch.device | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full parameters of a sharded (or plain) model, in buckets of about ``bucket_bytes``: a list of
    ``(name, tensor)`` per bucket, names as in ``model.named_parameters()`` (tied weights once).

    For pushing weights to a rollout engine: only one bucket of full tensors exists at a time, never
    a whole model copy. Every rank must iterate to the end (each tensor is an all-gather); all ranks
    receive the full tensors, so any of them may forward them. ``device``: where CPU-offloaded shards
    are gathered (default: where they are)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        tensor = full_tensor(param, device)
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip gradients to a global norm and return the norm before clipping, as a float. With sharded
    gradients the norm is over the whole model (all ranks), so every rank gets the same value.

    FSDP shards every element onto exactly one rank, so the squared norm is the sum over ranks of
    the local shards' squared norms: one all-reduce of a number. Unlike a DTensor norm this also works
    for CPU-offloaded gradients under NCCL."""
    params = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in local:
        by_device.setdefault(g.device, []).append(g)
    squares = sum(  # one host sync per device, not one per parameter
        float(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square().sum())
        for grads in by_device.values()
    )
    norm = all_reduce_sum([squares])[0] ** 0.5
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:  # a non-finite norm leaves the gradients alone: the caller skips the step
        for g in local:
            g.mul_(scale)
    return norm
