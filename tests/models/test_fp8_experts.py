"""fp8 experts (moe.expert_dtype=fp8, rollouts): per-output-channel e4m3 quantization, zeros and
all-zero channels, a tiny MoE expert block within a stated tolerance of float32 and bf16 on both
paths (the reference path dequantizes; the scaled-matmul path runs through torch's CPU
``_scaled_mm`` here and on CUDA where a Hopper GPU is present), and the nvfp4/fp8 capability
checks as pure functions.

Measured on this tiny block (E=4, H=64, I=32, 48 tokens, top-2, Gaussian weights of unit-variance
outputs, seeds 0-3), relative error ||y - y_fp32|| / ||y_fp32||: reference path (weights only in
fp8) 4.2-4.7%; scaled-matmul path (weights and per-token activations in fp8, bf16 output)
5.8-7.1%; bf16 weights 0.6%. e4m3 rounds each weight by up to 1/16 of itself (2.5% RMS relative
error per matrix here), and the SwiGLU block stacks three matrices. Asserted: < 6% (reference),
< 8.5% (scaled), the same against the bf16 block."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.models.moe.fp8_experts import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8_rows,
    fp8_grouped_experts,
    quantize_experts,
    quantize_fp8_rows,
    quantize_model_experts,
    scaled_mm_capable,
)
from posttrain.models.moe import check_expert_dtype_capability
from posttrain.models.moe.grouped_experts import grouped_experts

E, H, I, T, K = 4, 64, 32, 48, 2
FP8_REL_TOLERANCE = {False: 0.06, True: 0.085}  # use_scaled_mm -> bound


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def tiny_block(seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    down = torch.randn(E, H, I, generator=g) * I ** -0.5
    hidden = torch.randn(T, H, generator=g)
    weights, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    return [t.to(device) for t in (hidden, ids, weights, gate_up, down)]


def test_quantization_is_per_output_channel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, 32, generator=g)
    w[1, 2] *= 1000.0  # one loud channel must not coarsen the others
    codes, scales = quantize_fp8_rows(w)
    assert codes.dtype == FP8_DTYPE and codes.shape == w.shape and scales.shape == (3, 8) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, w.abs().amax(-1) / FP8_MAX)
    assert torch.equal(codes.float().abs().amax(-1), torch.full((3, 8), FP8_MAX))  # each row's max hits 448
    # Relative error per element stays at e4m3's (3 mantissa bits: half an ulp is 1/16) in every row,
    # the quiet rows of expert 1 included.
    back = dequantize_fp8_rows(codes, scales)
    big = w.abs() > w.abs().amax(-1, keepdim=True) / 64  # normal range of e4m3 relative to each row's max
    assert float(((back - w).abs() / w.abs())[big].max()) <= 1 / 16 + 1e-6
    quiet = torch.cat([w[1, :2], w[1, 3:]])
    torch.testing.assert_close(torch.cat([back[1, :2], back[1, 3:]]), quiet, rtol=1 / 16, atol=quiet.abs().amax() / 64)


def test_zeros_and_an_all_zero_channel():
    w = torch.randn(2, 4, 16)
    w[0, 1] = 0.0
    w[1, 3, :5] = 0.0
    codes, scales = quantize_fp8_rows(w)
    assert scales[0, 1] == 1.0 and not codes[0, 1].float().any()  # no 0/0
    back = dequantize_fp8_rows(codes, scales)
    assert torch.isfinite(back).all() and not back[0, 1].any() and not back[1, 3, :5].any()
    # A whole block of zeros (a fresh layer) and zero activations: finite zeros on both paths.
    experts = quantize_experts(torch.zeros(E, 2 * I, H), torch.zeros(E, H, I))
    hidden, ids, weights, *_ = tiny_block()
    for scaled in (False, True):
        out = fp8_grouped_experts(hidden, ids, weights, experts, use_scaled_mm=scaled)
        assert torch.isfinite(out).all() and not out.any()
    experts = quantize_experts(*tiny_block()[3:])
    for scaled in (False, True):
        out = fp8_grouped_experts(torch.zeros(T, H), ids, weights, experts, use_scaled_mm=scaled)
        assert torch.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("scaled", [False, True], ids=["reference", "scaled_mm_cpu"])
def test_tiny_block_within_tolerance_of_fp32_and_bf16(scaled):
    hidden, ids, weights, gate_up, down = tiny_block()
    want = grouped_experts(hidden, ids, weights, gate_up, down)
    bf16 = grouped_experts(hidden.bfloat16(), ids, weights.bfloat16(), gate_up.bfloat16(), down.bfloat16())
    experts = quantize_experts(gate_up, down)
    assert experts.nbytes() < (gate_up.numel() + down.numel()) * 1.1  # ~1 byte per weight (4 in fp32)
    got = fp8_grouped_experts(hidden, ids, weights, experts, use_scaled_mm=scaled)
    assert got.shape == (T, H) and got.dtype == torch.float32
    err, err_bf16 = relative_error(got, want), relative_error(got, bf16)
    assert err < FP8_REL_TOLERANCE[scaled] and err_bf16 < FP8_REL_TOLERANCE[scaled], (err, err_bf16)
    assert relative_error(bf16, want) < 0.01
    assert err > 1e-4  # it really is quantized


def test_scaled_mm_path_is_the_emulated_w8a8_product():
    """The scaled path = per-token fp8 activations times per-channel fp8 weights, dequantized (bf16 out)."""
    hidden, ids, weights, gate_up, down = tiny_block(seed=3)
    experts = quantize_experts(gate_up, down)
    got = fp8_grouped_experts(hidden, ids, weights, experts, use_scaled_mm=True)

    def emulated(x, codes, scales):
        x_codes, x_scales = quantize_fp8_rows(x)
        return (dequantize_fp8_rows(x_codes, x_scales) @ dequantize_fp8_rows(codes, scales).t()).bfloat16().float()

    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            gate, up = emulated(hidden[t:t + 1], experts.gate_up[e], experts.gate_up_scale[e]).chunk(2, -1)
            act = torch.nn.functional.silu(gate) * up
            want[t] += weights[t, j] * emulated(act, experts.down[e], experts.down_scale[e])[0]
    # Rows are quantized per token, so batching changes only the order of additions (which can
    # move an intermediate value across an fp8 code boundary now and then).
    assert relative_error(got, want) < 2e-3


def test_quantize_model_experts_finds_stacked_experts():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H))
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, I))

    model = torch.nn.ModuleDict({"layer0": torch.nn.ModuleDict({"experts": Experts(), "dense": torch.nn.Linear(4, 4)})})
    found = quantize_model_experts(model)
    assert list(found) == ["layer0.experts"]
    assert found["layer0.experts"].gate_up.shape == (E, 2 * I, H) and found["layer0.experts"].down_scale.shape == (E, H)


@pytest.mark.parametrize("dtype, capability, ok", [
    ("nvfp4", (10, 0), True), ("nvfp4", (12, 0), True), ("nvfp4", (9, 0), False), ("nvfp4", (8, 0), False),
    ("fp8", (8, 9), True), ("fp8", (9, 0), True), ("fp8", (8, 6), False), ("auto", (7, 0), True), ("bf16", (7, 0), True),
])
def test_expert_dtype_capability(dtype, capability, ok):
    if ok:
        check_expert_dtype_capability(dtype, capability, "GPU X")
        return
    with pytest.raises(ConfigError) as info:
        check_expert_dtype_capability(dtype, capability, "GPU X")
    message = str(info.value)
    assert f"GPU X has compute capability {capability[0]}.{capability[1]}" in message
    assert f"moe.expert_dtype={dtype} needs an NVIDIA GPU of compute capability" in message
    if dtype == "nvfp4":
        assert "10.0" in message and ("Use moe.expert_dtype=fp8" in message) == (capability >= (8, 9))


def test_scaled_mm_capability():
    assert scaled_mm_capable((9, 0)) and scaled_mm_capable((10, 0)) and not scaled_mm_capable((8, 9))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA GPU of compute capability 9.0+ (rowwise torch._scaled_mm)")
def test_scaled_mm_on_hopper_matches_the_reference():
    hidden, ids, weights, gate_up, down = tiny_block(device="cuda")
    experts = quantize_experts(gate_up, down)
    want = grouped_experts(hidden, ids, weights, gate_up, down, use_grouped_mm=False)
    got = fp8_grouped_experts(hidden.bfloat16(), ids, weights.bfloat16(), experts)  # picks the scaled path
    reference = fp8_grouped_experts(hidden.bfloat16(), ids, weights.bfloat16(), experts, use_scaled_mm=False)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < FP8_REL_TOLERANCE[True]
    assert relative_error(got, reference) < FP8_REL_TOLERANCE[True]
