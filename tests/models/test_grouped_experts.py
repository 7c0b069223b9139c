"""Grouped experts (posttrain/models/moe/grouped_experts.py) against a per-token loop, and
transformers' MoE blocks swapped onto them (hf_blocks.py) against transformers' own experts:
logits and gradients of tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GraniteMoE models,
an expert that gets no tokens, and the record and replay hook of the routes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import make_tiny_llama, make_tokenizer

from posttrain.errors import PosttrainError
from posttrain.models.moe import RouterRecorder, apply_router_dtype, moe_shape
from posttrain.models.moe.grouped_experts import (
    grouped_experts,
    grouped_mm_supported,
    sort_by_expert,
)
from posttrain.models.moe.hf_blocks import FAMILIES, replay_weights, use_grouped_experts

# float32 on the CPU: the grouped path sums the same products in another order than
# transformers' per-expert loop, so results agree to rounding, not bit for bit.
ATOL, RTOL = 1e-5, 1e-4
VOCAB, HIDDEN, EXPERTS, TOP_K = 64, 32, 6, 2
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_experts_per_tok": TOP_K, "max_position_embeddings": 64, "pad_token_id": 0,
          "eos_token_id": 1, "bos_token_id": None}
# family -> (config class name, its MoE-specific settings): both norm_topk_prob settings are covered.
CONFIGS = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 24, "num_local_experts": EXPERTS}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 24, "moe_intermediate_size": 16, "num_experts": EXPERTS,
                                     "shared_expert_intermediate_size": 40, "norm_topk_prob": False,
                                     "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 24, "moe_intermediate_size": 16, "num_experts": EXPERTS,
                                     "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                     "head_dim": 8}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 16, "num_experts": EXPERTS, "norm_topk_prob": False}),
    "granitemoe": ("GraniteMoeConfig", {"intermediate_size": 16, "num_local_experts": EXPERTS,
                                        "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                        "logits_scaling": 2.0, "attention_multiplier": 0.25}),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random float32 causal LM of ``family`` on transformers' per-expert loop ("eager")."""
    config_name, moe = CONFIGS[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(**COMMON, **moe)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                                          experts_implementation="eager")
    return model.eval()


def batch(seed: int = 1, rows: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def per_token_reference(hidden, topk_ids, topk_weights, gate_up_proj, down_proj):
    """The definition, one token and one chosen expert at a time."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (gate_up_proj[e] @ hidden[t]).chunk(2)
            out[t] += topk_weights[t, j] * (down_proj[e] @ (F.silu(gate) * up))
    return out


def random_experts(tokens=11, hidden=16, inter=8, experts=5, k=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=dtype)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=dtype) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=gen, dtype=dtype) / inter ** 0.5
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen, dtype=dtype)
    return x, ids, weights, gate_up, down


# ---------------------------------------------------------------- the grouped function


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_experts_equal_a_per_token_loop_with_gradients(k):
    x, ids, weights, gate_up, down = random_experts(k=k, seed=k)
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    expected_leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    got = grouped_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    expected = per_token_reference(expected_leaves[0], ids, *expected_leaves[1:])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    probe = torch.randn_like(expected)
    (got * probe).sum().backward()
    (expected * probe).sum().backward()
    for mine, theirs in zip(leaves, expected_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=ATOL, rtol=RTOL)


def test_experts_that_get_no_tokens_cost_nothing_and_get_zero_gradient():
    x, _, weights, gate_up, down = random_experts(tokens=7, experts=6)
    ids = torch.tensor([[0, 4]] * 4 + [[4, 0]] * 3)  # experts 1, 2, 3 and 5 get nothing
    order, counts = sort_by_expert(ids, 6)
    assert counts.tolist() == [7, 0, 0, 0, 7, 0]
    assert (ids.reshape(-1)[order] == torch.tensor([0] * 7 + [4] * 7)).all()
    gate_up.requires_grad_()
    got = grouped_experts(x, ids, weights, gate_up, down)
    torch.testing.assert_close(got, per_token_reference(x, ids, weights, gate_up, down), atol=ATOL, rtol=RTOL)
    got.sum().backward()
    assert gate_up.grad[[1, 2, 3, 5]].abs().sum() == 0 and gate_up.grad[[0, 4]].abs().sum() > 0
    # No tokens at all (an empty micro-batch) gives an empty output.
    assert grouped_experts(x[:0], ids[:0], weights[:0], gate_up, down).shape == (0, x.shape[1])


def test_grouped_experts_follow_autocast_and_keep_the_input_dtype():
    x, ids, weights, gate_up, down = random_experts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_experts(x, ids, weights, gate_up, down)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, per_token_reference(x, ids, weights, gate_up, down), atol=5e-2, rtol=5e-2)
    assert not grouped_mm_supported(x, gate_up, torch.bfloat16)  # CPU: the segment loop


def test_out_of_range_expert_ids_raise():
    x, ids, weights, gate_up, down = random_experts(experts=5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        grouped_experts(x, ids + 3, weights, gate_up, down)


def test_the_grouped_mm_call_equals_the_segment_loop_where_torch_runs_it_on_the_cpu():
    """The same torch._grouped_mm call (offsets, transposed weight views, autograd, an empty
    expert) as on the GPU, through the CPU kernel that recent torch versions ship."""
    x, ids, weights, gate_up, down = random_experts(tokens=40, hidden=64, inter=32, experts=8)
    ids[ids == 3] = 0  # expert 3 gets no tokens
    leaves = {path: [t.clone().requires_grad_() for t in (x, weights, gate_up, down)] for path in (0, 1)}
    (xg, wg, gug, downg), (xl, wl, gul, downl) = leaves[1], leaves[0]
    try:
        grouped = grouped_experts(xg, ids, wg, gug, downg, use_grouped_mm=True)
    except (AttributeError, NotImplementedError, RuntimeError) as error:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._grouped_mm ({type(error).__name__})")
    loop = grouped_experts(xl, ids, wl, gul, downl, use_grouped_mm=False)
    torch.testing.assert_close(grouped, loop, atol=ATOL, rtol=RTOL)
    grouped.square().sum().backward()
    loop.square().sum().backward()
    for a, b in zip(leaves[1], leaves[0]):
        torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=RTOL)
    assert gug.grad[3].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._grouped_mm needs a CUDA GPU of compute capability 9.0+")
def test_grouped_mm_equals_the_segment_loop_on_the_gpu():
    x, ids, weights, gate_up, down = (t.cuda() for t in random_experts(tokens=300, hidden=64, inter=32, experts=8))
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # expert 3 gets no tokens
    ids[:, 1] = torch.where(ids[:, 1] == 3, (ids[:, 0] + 1) % 3, ids[:, 1])
    leaves = {path: [t.to(torch.bfloat16).requires_grad_() for t in (x, weights, gate_up, down)] for path in (0, 1)}
    assert grouped_mm_supported(leaves[1][0], leaves[1][2], torch.bfloat16)
    outs = {path: grouped_experts(ls[0], ids, ls[1], ls[2], ls[3], use_grouped_mm=bool(path)) for path, ls in leaves.items()}
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    for out in outs.values():
        out.float().square().sum().backward()
    for grouped, loop in zip(leaves[1], leaves[0]):
        torch.testing.assert_close(grouped.grad.float(), loop.grad.float(), atol=5e-2, rtol=5e-2)
    assert leaves[1][2].grad[3].abs().sum() == 0


# ---------------------------------------------------------------- transformers' models swapped


@pytest.mark.parametrize("family", list(CONFIGS))
def test_swapped_model_equals_transformers_logits_and_gradients(family):
    reference = tiny_model(family)
    model = copy.deepcopy(reference)
    moe = use_grouped_experts(model)
    assert moe.num_layers == 2 == moe_shape(model).num_layers
    assert {type(b).__name__ for b in moe.blocks} <= set(FAMILIES)
    assert model.state_dict().keys() == reference.state_dict().keys()  # parameters untouched
    inputs = batch()
    expected = reference(**inputs).logits
    with moe.recording() as routes:
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert [tuple(r.shape) for r in routes] == [(18, TOP_K)] * 2 and routes[0].dtype == torch.long
    probe = torch.randn_like(expected)
    (got * probe).sum().backward()
    (expected * probe).sum().backward()
    theirs = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=ATOL, rtol=RTOL, msg=name)


def test_mixtral_router_jitter_in_training_mode_equals_transformers():
    reference = tiny_model("mixtral").train()
    model = copy.deepcopy(reference)
    use_grouped_experts(model)
    for m in (reference, model):
        for layer in m.model.layers:
            layer.mlp.jitter_noise = 0.2
    inputs = batch(seed=5)
    torch.manual_seed(7)
    expected = reference(**inputs).logits
    torch.manual_seed(7)  # the same noise draws
    torch.testing.assert_close(model(**inputs).logits, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_replaying_the_recorded_routes_changes_nothing(family):
    model = tiny_model(family)
    moe = use_grouped_experts(model)
    inputs = batch(seed=2)
    with moe.recording() as routes:
        expected = model(**inputs).logits
    # Routes stored compactly (as an engine would) replay the same.
    with moe.replaying([r.to(torch.int16) for r in routes]), moe.recording() as replayed:
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(replayed, routes))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_replay_weights_of_a_routers_own_choice_are_its_weights(family):
    model = tiny_model(family)
    block = use_grouped_experts(model).blocks[0]
    spec = FAMILIES[type(block).__name__]
    router = getattr(block, spec.router)
    x = torch.randn(13, HIDDEN)
    logits, weights, ids = router(x)
    renormalize = spec.renormalize if spec.renormalize is not None else router.norm_topk_prob
    got = replay_weights(logits, ids, renormalize, torch.float32 if spec.float32_weights else logits.dtype)
    torch.testing.assert_close(got, weights, atol=1e-6, rtol=1e-6)


def test_replayed_routes_are_used_and_the_router_still_learns():
    model = tiny_model("qwen3_moe")
    moe = use_grouped_experts(model)
    inputs = batch(seed=3)
    with moe.recording() as routes:
        own = model(**inputs).logits
    forced = [torch.full_like(r, 0) for r in routes]
    forced = [torch.stack([f[:, 0], f[:, 1] + 5], dim=-1) for f in forced]  # every token to experts 0 and 5
    with moe.replaying(forced), moe.recording() as used:
        got = model(**inputs).logits
    assert all(torch.equal(u, f) for u, f in zip(used, forced))
    assert not torch.allclose(got, own, atol=1e-3)
    # Expert 0 and 5 only: the others get no gradient, the routers (softmax over all logits) do.
    got.square().mean().backward()
    for block in moe.blocks:
        assert block.experts.gate_up_proj.grad[1:5].abs().sum() == 0
        assert block.experts.gate_up_proj.grad[[0, 5]].abs().sum() > 0
        assert block.gate.weight.grad.abs().sum() > 0
    with pytest.raises(PosttrainError, match="1 layers"), moe.replaying(forced[:1]):
        pass
    with pytest.raises(PosttrainError, match="shape"), moe.replaying([f[:5] for f in forced]):
        model(**inputs)


def test_an_expert_without_tokens_in_a_swapped_block_equals_transformers():
    reference = tiny_model("mixtral")
    model = copy.deepcopy(reference)
    moe = use_grouped_experts(model)
    x = torch.randn(10, HIDDEN)
    ids = torch.tensor([[0, 2]] * 6 + [[5, 2]] * 4)  # experts 1, 3 and 4 get nothing
    weights = torch.rand(10, TOP_K)
    experts = moe.blocks[0].experts
    got = grouped_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, experts.act_fn)
    expected = reference.model.layers[0].mlp.experts(x, ids, weights)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_swap_keeps_router_hooks_float32_routers_copies_and_restores():
    reference = tiny_model("mixtral")
    model = copy.deepcopy(reference)
    assert apply_router_dtype(model, "float32") == 2
    moe = use_grouped_experts(model)
    assert use_grouped_experts(model) is moe  # a second call returns the same handle
    recorder = RouterRecorder(model, moe_shape(model))
    inputs = batch(seed=4)
    with recorder.recording() as records, moe.recording() as routes:
        logits = model(**inputs).logits
    assert len(records) == 2 and all(torch.equal(rec.selected, r) for rec, r in zip(records, routes))
    # deepcopy (the KL reference) gets its own blocks and handle.
    twin = copy.deepcopy(model)
    twin_moe = use_grouped_experts(twin)
    assert twin_moe is not moe and twin_moe.blocks[0] is twin.model.layers[0].mlp
    torch.testing.assert_close(twin(**inputs).logits, logits)
    moe.restore()
    assert "forward" not in vars(model.model.layers[0].mlp)
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=ATOL, rtol=RTOL)


def test_a_dense_model_has_no_moe_layers():
    assert use_grouped_experts(make_tiny_llama(make_tokenizer())).num_layers == 0
