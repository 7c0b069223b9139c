"""MoE models in posttrain's engine: greedy completions equal transformers' greedy ``generate``, and
the routes the engine records equal the ones the routers choose when the finished sequence is run
through the model (tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GraniteMoE on the CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import make_tokenizer

from posttrain.engine import Engine
from posttrain.engine.paged_model import MOE_MODEL_TYPES
from posttrain.models.moe.hf_blocks import use_grouped_experts
from posttrain.rollout import SamplingParams

EXPERTS, TOP_K = 6, 2
TEXTS = ["What is 2+3?", "Hi", "A longer prompt here, long enough to span several blocks", "What is 2+3?"]
# model type -> (config class name, its MoE settings): every family's routing and attention quirk
# is on (both norm_topk_prob values, a dense layer between MoE layers, OLMoE's clip_qkv,
# GraniteMoE's multipliers).
CONFIGS = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 24, "num_local_experts": EXPERTS}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 24, "moe_intermediate_size": 16, "num_experts": EXPERTS,
                                     "shared_expert_intermediate_size": 40, "norm_topk_prob": False,
                                     "decoder_sparse_step": 1, "mlp_only_layers": [1], "num_hidden_layers": 3}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 24, "moe_intermediate_size": 16, "num_experts": EXPERTS,
                                     "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                     "head_dim": 16}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 16, "num_experts": EXPERTS, "norm_topk_prob": False,
                              "clip_qkv": 2.0}),
    "granitemoe": ("GraniteMoeConfig", {"intermediate_size": 16, "num_local_experts": EXPERTS,
                                        "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                        "logits_scaling": 2.0, "attention_multiplier": 0.25}),
}


def tiny_moe(model_type: str, tok, seed: int = 0) -> torch.nn.Module:
    """A tiny random float32 MoE causal LM on transformers' own experts."""
    config_name, moe = CONFIGS[model_type]
    settings = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_experts_per_tok": TOP_K, "max_position_embeddings": 256,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = getattr(transformers, config_name)(**{**settings, **moe})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.max_length = None
    return model.eval()


def reference_greedy(model, tok, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def reference_routes(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(num_moe_layers, tokens - 1, top_k): the routers' choices over prompt + completion, in one
    forward of the whole sequence, without its last token (the engine never runs it)."""
    moe = use_grouped_experts(model)
    tokens = torch.tensor([prompt + completion])
    with torch.no_grad(), moe.recording() as routes:
        model(tokens)
    return torch.stack(routes)[:, : tokens.shape[1] - 1]


def test_every_moe_model_type_is_covered():
    assert set(CONFIGS) == set(MOE_MODEL_TYPES)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_greedy_matches_transformers_and_routes_match_the_routers(model_type):
    tok = make_tokenizer()
    model = tiny_moe(model_type, tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    expected = [reference_greedy(model, tok, p, 16) for p in prompts]  # transformers' experts, before the engine
    engine = Engine(model, tok, max_model_len=128, block_size=4, max_num_seqs=8)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=16))
    num_moe_layers = engine.runner.decoder.num_moe_layers
    assert num_moe_layers == (2 if model_type == "qwen2_moe" else model.config.num_hidden_layers)
    for prompt, ref, group in zip(prompts, expected, out):
        for completion in group:
            assert completion.token_ids == ref
            routes = completion.routed_experts
            assert routes.dtype == torch.int16 and routes.device.type == "cpu"
            assert routes.shape == (num_moe_layers, len(prompt) + len(ref) - 1, TOP_K)
            assert torch.equal(routes.long(), reference_routes(model, prompt, ref))
    # The samples of a prompt and the repeated prompt shared prompt blocks: their prompt tokens'
    # routes came from the route cache, written by the step that computed those blocks.
    assert engine.stats()["engine/prefix_cache_hit_tokens"] > 0


def test_continuous_batching_preemption_and_sleep_keep_the_routes():
    """Requests of different lengths join and leave the decode batch at different steps, a small
    KV cache preempts and recomputes sequences, and the cache is freed and allocated again."""
    tok = make_tokenizer()
    model = tiny_moe("mixtral", tok, seed=3)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS[:3]] + [[5, 6, 7, 8, 9, 10, 11]]
    lengths = [5, 23, 9, 17]
    d = Engine(model, tok, max_model_len=96, block_size=4).runner.decoder
    bytes_per_block = 4 * (2 * d.num_layers * d.num_kv_heads * d.head_dim * 4 + d.num_moe_layers * TOP_K * 2)
    engine = Engine(model, tok, max_model_len=96, block_size=4, max_num_seqs=3,
                    cpu_kv_cache_gb=24 * bytes_per_block / 2**30)
    assert engine.runner.num_blocks == 24

    def run() -> list:
        groups = [engine.add_request(p, SamplingParams(n=2, temperature=0.0, max_tokens=n, ignore_eos=True))
                  for p, n in zip(prompts, lengths)]
        engine.run_until_done()
        return [[engine.completion(s) for s in group] for group in groups]

    first = run()
    assert engine.stats()["engine/preemptions"] > 0
    for prompt, n, group in zip(prompts, lengths, first):
        for c in group:
            assert len(c.token_ids) == n
            assert torch.equal(c.routed_experts.long(), reference_routes(model, prompt, c.token_ids))
    engine.sleep()
    assert engine.runner.route_cache is None
    engine.wake()
    second = run()
    assert [[c.token_ids for c in g] for g in second] == [[c.token_ids for c in g] for g in first]
    assert all(torch.equal(a.routed_experts, b.routed_experts) for g, h in zip(first, second) for a, b in zip(g, h))


def test_experts_the_grouped_experts_cannot_run_are_refused_naming_the_backend_to_use():
    from posttrain.errors import PosttrainError

    tok = make_tokenizer()
    model = tiny_moe("mixtral", tok)
    model.model.layers[0].mlp.experts.has_bias = True  # as if its experts had biases
    with pytest.raises(PosttrainError, match="has_bias.*rollout.backend=hf"):
        Engine(model, tok, max_model_len=32)


def test_dense_models_record_no_routes():
    from helpers import make_tiny_llama

    tok = make_tokenizer()
    engine = Engine(make_tiny_llama(tok), tok, max_model_len=64, block_size=4)
    [[c]] = engine.generate([tok("Hi", add_special_tokens=False).input_ids], SamplingParams(temperature=0.0, max_tokens=4))
    assert c.routed_experts is None
    assert engine.runner.decoder.moe is None and engine.runner.route_cache is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_of_an_moe_model_equals_eager_decode():
    """On a GPU with torch._grouped_mm (bf16, compute capability 9.0+) the MoE layers have no host
    sync, so decode steps are captured (a sync during capture would fail it); graph replays give
    the tokens and routes of eager decode."""
    from posttrain.models.moe.grouped_experts import grouped_mm_supported

    tok = make_tokenizer()
    model = tiny_moe("qwen3_moe", tok).cuda()
    if not grouped_mm_supported(torch.empty(0, device="cuda"), model.model.layers[0].mlp.experts.gate_up_proj,
                                torch.bfloat16):
        pytest.skip("this GPU or torch has no torch._grouped_mm")
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = []
    for cuda_graphs in (True, False):
        engine = Engine(model, tok, max_model_len=128, compute_dtype=torch.bfloat16, cuda_graphs=cuda_graphs,
                        max_num_seqs=8, kv_cache_memory_fraction=0.05)
        assert bool(engine.runner.graphs) == cuda_graphs
        outs.append([c for group in engine.generate(prompts, params) for c in group])
        engine.sleep()
    for graphed, eager in zip(*outs):
        assert graphed.token_ids == eager.token_ids
        assert torch.equal(graphed.routed_experts, eager.routed_experts)


def test_float32_routers_stay_float32_in_bf16_cpu_rollouts():
    # moe.router.dtype=float32 with rollout.engine.cpu_dtype=bfloat16: the engine's bf16 weight swap
    # leaves the routers' weights in float32, so routing computes in float32 as in the trainer.
    from posttrain.models.moe import apply_router_dtype, find_routers

    tok = make_tokenizer()
    model = tiny_moe("qwen3_moe", tok)
    assert apply_router_dtype(model, "float32") > 0
    routers, _ = find_routers(model)
    engine = Engine(model, tok, max_model_len=64, cpu_dtype=torch.bfloat16)
    seen = []
    hooks = [r.register_forward_hook(lambda m, i, o: seen.append(next(m.parameters()).dtype)) for r in routers]
    try:
        out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        for h in hooks:
            h.remove()
    assert len(out[0][0].token_ids) == 6 and out[0][0].routed_experts is not None
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float32 weights are back
