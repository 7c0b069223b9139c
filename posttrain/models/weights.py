"""Moving weights into and out of a model by their Hugging Face names.

``load_named_tensors`` is the one place where an engine takes new weights: it copies into the
existing parameters and buffers in place (no reallocation, so CUDA graphs, KV caches and
optimizer references stay valid). ``iter_weight_buckets`` cuts a model's weights into buckets
of about ``bucket_mb`` megabytes for transfers that stream (broadcast, HTTP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import torch

from posttrain.errors import PosttrainError


class WeightLoadError(PosttrainError):
    """New weights do not fit the model: an unknown name or a shape that differs."""


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied weights under each of their names."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy ``named_tensors`` into ``model``'s parameters and buffers of the same names, in place.

    Tensors may be on another device or in another dtype (``copy_`` converts). Every name is
    checked before anything is copied, so a bad update leaves the model untouched.
    Returns the number of bytes read from ``named_tensors``."""
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    targets = named_weights(model)
    unknown = [name for name, _ in items if name not in targets]
    if unknown:
        example = next(iter(targets), "")
        raise WeightLoadError(
            f"{len(unknown)} weight name(s) are not in the model, e.g. '{unknown[0]}'. The model's names look "
            f"like '{example}'. Send Hugging Face parameter names of the same architecture (for a LoRA "
            "policy use sync.mode=lora, which sends the adapter only)."
        )
    for name, tensor in items:
        if tuple(tensor.shape) != tuple(targets[name].shape):
            raise WeightLoadError(
                f"Weight '{name}' has shape {tuple(tensor.shape)} but the model's is {tuple(targets[name].shape)}; "
                "the trainer and the engine must serve the same architecture."
            )
    copied = 0
    for name, tensor in items:
        targets[name].copy_(tensor, non_blocking=True)
        copied += tensor.numel() * tensor.element_size()
    if any(t.is_cuda for t in targets.values()):
        torch.cuda.synchronize()  # non_blocking host->device copies must land before generation
    return copied


def iter_weight_buckets(model: torch.nn.Module, bucket_mb: float = 512.0, dtype: torch.dtype | None = None,
                        trainable_only: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's parameters (each tied weight once) in buckets of at most ``bucket_mb`` MB.

    A tensor larger than a bucket makes a bucket of its own. ``dtype`` casts each tensor (e.g.
    float32 master weights sent as bfloat16, half the bytes); ``trainable_only`` keeps only
    parameters with ``requires_grad`` (the LoRA adapters of a peft model)."""
    limit = bucket_mb * (1 << 20)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        tensor = param.detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def weights_checksum(model: torch.nn.Module) -> str:
    """A SHA-256 over every parameter's name and float32 values (each tied weight once).

    Two models with equal weights give equal checksums whatever their device or dtype-exact
    storage, as long as the values are equal in float32."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def share_named_tensors(model: torch.nn.Module, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
    """Point ``model``'s parameters and buffers at ``named_tensors`` themselves: no copy, so later
    in-place changes to those tensors (an optimizer step in another process, through shared
    memory or CUDA IPC) are what the model computes with. Names, shapes, dtypes and devices must
    match exactly. Returns the number of tensors now shared."""
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    targets = named_weights(model)
    for name, tensor in items:
        if name not in targets:
            raise WeightLoadError(f"Weight '{name}' is not in the model; trainer and engine must serve the same architecture.")
        target = targets[name]
        if (tuple(tensor.shape), tensor.dtype, tensor.device) != (tuple(target.shape), target.dtype, target.device):
            raise WeightLoadError(
                f"Weight '{name}' cannot be shared: it is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the "
                f"model's is {tuple(target.shape)} {target.dtype} on {target.device}. Sharing needs the engine on the "
                "trainer's device with the trainer's parameter dtype."
            )
    for name, tensor in items:
        targets[name].data = tensor
    return len(items)
