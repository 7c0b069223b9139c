"""Grouped experts: every routed (token, expert) pair of an MoE layer in one pass, with tokens
sorted by expert so that each expert multiplies one contiguous slice.

Two paths compute the same thing. On a CUDA GPU of compute capability 9.0 or newer (Hopper,
Blackwell) with bf16 operands, each projection is one ``torch._grouped_mm`` over all experts: no
host synchronisation and no Python loop, so it can be captured in a CUDA graph. Elsewhere (the
CPU, float32, older GPUs) a segment loop multiplies each expert that received tokens with its own
slice; that is the reference path, and it syncs once to read the slice lengths.

Weights use transformers' stacked layout of gated SwiGLU experts (Mixtral, Qwen2/Qwen3-MoE, OLMoE,
GraniteMoE in transformers 5): ``gate_up_proj (E, 2I, H)`` (gate rows first, then up) and
``down_proj (E, H, I)``, each expert's slice a ``torch.nn.functional.linear`` weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the routed pairs of ``topk_ids (T, k)`` by expert.

    Returns ``order (T*k,)``: indices into the flattened pairs, sorted by expert (stable, so tokens
    keep their order within an expert); and ``counts (E,)``: pairs per expert (zero for an expert
    that received no tokens). Pair ``order[i]`` belongs to token ``order[i] // k``."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    if flat.is_cuda:  # histc rather than bincount: no host sync, so CUDA graphs can capture it
        counts = torch.histc(flat.int(), bins=num_experts, min=0, max=num_experts - 1).long()
    else:
        counts = torch.bincount(flat, minlength=num_experts)
        if counts.numel() > num_experts or (flat.numel() and int(flat.min()) < 0):
            raise ValueError(f"expert ids must lie in [0, {num_experts}); got ids from {int(flat.min())} to "
                             f"{int(flat.max())}")
    return order, counts


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def grouped_mm_supported(hidden: torch.Tensor, gate_up_proj: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs these experts: CUDA, bf16, compute capability 9.0+ (the
    kernels torch ships for Hopper and newer), and row lengths of whole 16-byte blocks."""
    if not (hasattr(torch, "_grouped_mm") and hidden.is_cuda and dtype == torch.bfloat16):
        return False
    hidden_size, intermediate = gate_up_proj.shape[2], gate_up_proj.shape[1] // 2
    return _capability(hidden.device.index or 0) >= (9, 0) and hidden_size % 8 == 0 and intermediate % 8 == 0


def _swiglu_grouped_mm(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                       down_proj: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    # torch._grouped_mm(A (S, K), B (E, K, N), offs=cumulative group ends (E,) int32) -> (S, N):
    # rows offs[e-1]:offs[e] of A times B[e]. The stored (E, N, K) weights enter as a transposed view.
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate, up = torch._grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(act_fn(gate) * up, down_proj.transpose(-2, -1), offs=offsets)


def _swiglu_segment_loop(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:  # an expert that received no tokens costs nothing
            continue
        gate, up = F.linear(x[start:start + count], gate_up_proj[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(act_fn(gate) * up, down_proj[expert]))
        start += count
    return torch.cat(outputs) if outputs else x.new_zeros(0, down_proj.shape[1])


def grouped_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Callable = F.silu,
                    use_grouped_mm: bool | None = None) -> torch.Tensor:
    """The weighted sum of each token's routed SwiGLU experts, ``(T, H)``.

    ``hidden (T, H)``; ``topk_ids (T, k)`` expert ids; ``topk_weights (T, k)`` routing weights;
    ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``. Per token t:
    ``sum_j w[t, j] * down[e] @ (act(gate[e] @ h[t]) * (up[e] @ h[t]))`` with ``e = topk_ids[t, j]``.

    ``use_grouped_mm``: None picks ``torch._grouped_mm`` where :func:`grouped_mm_supported`, else
    the segment loop; True/False forces one. Under autocast the matmuls run in the autocast dtype,
    as ``F.linear`` would. The output has ``hidden``'s dtype; gradients flow to ``hidden``,
    ``topk_weights`` and both weights."""
    num_tokens, top_k = topk_ids.shape
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else gate_up_proj.dtype
    order, counts = sort_by_expert(topk_ids, gate_up_proj.shape[0])
    x = hidden[order // top_k].to(dtype)  # (T*k, H): pair i of the sorted order
    gate_up_proj, down_proj = gate_up_proj.to(dtype), down_proj.to(dtype)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(hidden, gate_up_proj, dtype)
    expert_fn = _swiglu_grouped_mm if use_grouped_mm else _swiglu_segment_loop
    y = expert_fn(x, counts, gate_up_proj, down_proj, act_fn)  # (T*k, H), sorted order
    y = y * topk_weights.reshape(-1)[order].unsqueeze(-1)
    # Back to (token, slot) order and summed over the k slots: a permutation and a sum, so the
    # result is deterministic (index_add_ with repeated indices is not, on CUDA).
    y = torch.zeros_like(y).index_copy(0, order, y)
    return y.view(num_tokens, top_k, y.shape[-1]).sum(1).to(hidden.dtype)
