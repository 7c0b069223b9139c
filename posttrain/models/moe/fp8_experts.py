"""fp8 expert weights for rollouts (``moe.expert_dtype=fp8``): the stacked SwiGLU experts stored
as float8 e4m3 with one float32 scale per output channel, quantized once per weight sync, and the
grouped-experts forward that runs on them. See docs/moe.md ("fp8 experts").

Quantization (:func:`quantize_fp8_rows`): for each output channel (a row of an ``F.linear``
weight: ``gate_up_proj (E, 2I, H)`` has 2I per expert, ``down_proj (E, H, I)`` has H), the scale is
``amax / 448`` (448: the largest e4m3 number), and ``w_q = w / scale`` rounded to e4m3. An
all-zero channel gets scale 1 (its codes are 0, it dequantizes to 0; no division by zero).

Two forward paths compute the same layer:

- the reference path (any device; the CPU): dequantize the weights (``w_q * scale``) and run
  :func:`grouped_experts` on them. Only the weights are quantized.
- the scaled-matmul path (CUDA, compute capability 9.0+, hidden and intermediate sizes multiples
  of 16): per expert, the activations are quantized to e4m3 per token (row) on the fly and
  ``torch._scaled_mm`` multiplies e4m3 by e4m3 with the row scales of both sides (rowwise
  scaling: ``scale_a (M, 1)``, ``scale_b (1, N)``, float32), output bf16. A segment loop: one host
  sync per layer to read the expert counts, so it is not captured by CUDA graphs (a
  ``torch._scaled_grouped_mm`` path would be; not written yet). torch's CPU build also has
  ``_scaled_mm``, which is how the tests exercise this path without a GPU.

Inference only: nothing here is differentiated (rollouts need no gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.models.moe.grouped_experts import grouped_experts, sort_by_expert

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Rowwise-scaled torch._scaled_mm: the kernels torch ships for Hopper and newer.
SCALED_MM_CAPABILITY = (9, 0)


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (..., N, K)`` -> ``(codes (..., N, K) float8_e4m3fn, scales (..., N) float32)``,
    one scale per row (output channel): ``amax(|row|) / 448``, 1 for an all-zero row, so that
    ``codes.float() * scales[..., None]`` approximates ``weight`` and each row's largest
    magnitude is exactly 448 in the codes."""
    with torch.no_grad():
        w = weight.detach().float()
        amax = w.abs().amax(dim=-1)
        scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (w / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def dequantize_fp8_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`quantize_fp8_rows` (up to the rounding): ``codes * scales[..., None]``."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


@dataclass(frozen=True)
class FP8Experts:
    """One MoE layer's experts in fp8: ``gate_up (E, 2I, H)`` and ``down (E, H, I)`` e4m3 codes,
    with per-output-channel float32 scales ``gate_up_scale (E, 2I)`` and ``down_scale (E, H)``."""

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj, down_proj)`` in ``dtype``: the weights the reference path multiplies."""
        return dequantize_fp8_rows(self.gate_up, self.gate_up_scale, dtype), dequantize_fp8_rows(self.down, self.down_scale, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.gate_up_scale, self.down, self.down_scale))


def quantize_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> FP8Experts:
    """Quantize one layer's stacked experts (transformers' layout, any float dtype, any device).
    Call once per weight sync, after the new weights are in place."""
    gate_up, gate_up_scale = quantize_fp8_rows(gate_up_proj)
    down, down_scale = quantize_fp8_rows(down_proj)
    return FP8Experts(gate_up, gate_up_scale, down, down_scale)


def quantize_model_experts(model: torch.nn.Module) -> dict[str, FP8Experts]:
    """Every stacked-experts module of ``model`` (one with 3-D ``gate_up_proj`` and ``down_proj``:
    transformers 5's Mixtral, Qwen2/Qwen3-MoE, OLMoE, GraniteMoE experts) -> its fp8 weights, keyed
    by module name. The engine calls this after each weight push."""
    out = {}
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3:
            out[name] = quantize_experts(gate_up, down)
    return out


# ---------------------------------------------------------------- capability checks (pure)


def scaled_mm_capable(capability: tuple[int, int]) -> bool:
    """Whether rowwise-scaled ``torch._scaled_mm`` runs on a GPU of this compute capability."""
    return tuple(capability) >= SCALED_MM_CAPABILITY


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def scaled_mm_supported(hidden: torch.Tensor, experts: FP8Experts) -> bool:
    """The scaled-matmul path runs here: ``torch._scaled_mm`` exists, CUDA of capability 9.0+,
    and the hidden and intermediate sizes are multiples of 16 (the kernels' requirement)."""
    if not (hasattr(torch, "_scaled_mm") and hidden.is_cuda):
        return False
    hidden_size, intermediate = experts.gate_up.shape[2], experts.gate_up.shape[1] // 2
    return scaled_mm_capable(_capability(hidden.device.index or 0)) and hidden_size % 16 == 0 and intermediate % 16 == 0


# ---------------------------------------------------------------- the forward


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``F.linear(x, w)`` with ``w = codes * scales[:, None]`` (``codes (N, K)`` e4m3, ``scales
    (N,)``), ``x (M, K)`` quantized per row on the fly; one rowwise-scaled ``torch._scaled_mm``."""
    x_codes, x_scales = quantize_fp8_rows(x)
    return torch._scaled_mm(x_codes, codes.t(), scale_a=x_scales.unsqueeze(1).contiguous(),
                            scale_b=scales.unsqueeze(0).contiguous(), out_dtype=out_dtype)


def _swiglu_scaled_mm(x: torch.Tensor, counts: torch.Tensor, experts: FP8Experts, act_fn: Callable) -> torch.Tensor:
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        gate, up = fp8_linear(x[start:start + count], experts.gate_up[expert], experts.gate_up_scale[expert]).chunk(2, dim=-1)
        # The product in float32: bf16 rounding here would move values across fp8 code boundaries.
        outputs.append(fp8_linear(act_fn(gate.float()) * up.float(), experts.down[expert], experts.down_scale[expert]))
        start += count
    return torch.cat(outputs) if outputs else x.new_zeros(0, experts.down.shape[1], dtype=torch.bfloat16)


@torch.no_grad()
def fp8_grouped_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        experts: FP8Experts, act_fn: Callable = F.silu, use_scaled_mm: bool | None = None) -> torch.Tensor:
    """:func:`grouped_experts` on fp8 experts, ``(T, H)`` in ``hidden``'s dtype.

    ``use_scaled_mm``: None picks the scaled-matmul path where :func:`scaled_mm_supported`, else
    the reference path (dequantized weights in float32 on the CPU, ``hidden``'s dtype on a GPU);
    True/False forces one (True works on the CPU too, through torch's CPU ``_scaled_mm``)."""
    if use_scaled_mm is None:
        use_scaled_mm = scaled_mm_supported(hidden, experts)
    if not use_scaled_mm:
        dtype = torch.float32 if not hidden.is_cuda else hidden.dtype
        gate_up, down = experts.dequantize(dtype)
        return grouped_experts(hidden, topk_ids, topk_weights, gate_up, down, act_fn)
    num_tokens, top_k = topk_ids.shape
    order, counts = sort_by_expert(topk_ids, experts.num_experts)
    x = hidden[order // top_k]
    y = _swiglu_scaled_mm(x, counts, experts, act_fn).float()
    y = y * topk_weights.reshape(-1)[order].unsqueeze(-1).float()
    y = torch.zeros_like(y).index_copy(0, order, y)  # as grouped_experts: a permutation and a sum
    return y.view(num_tokens, top_k, y.shape[-1]).sum(1).to(hidden.dtype)
