"""posttrain's engine with fp8 experts (``moe.expert_dtype=fp8``) on tiny random MoE models on the
CPU (the reference path: e4m3 weights with per-output-channel scales, dequantized): logprobs within
a stated tolerance of the float32 model, greedy completions mostly equal, the quantized weights
follow every weight update (pushed tensors, or the shared modules stepped in place), and the
trainer's forwards outside the engine stay in full precision.

Tolerances (measured on these models, seeds 0-2, both families, 4 prompts x 12 greedy tokens):
the mean |logprob difference| per token between fp8 and float32 experts is 2.4e-4 to 3.9e-4 and
the largest 1.3e-3 (the experts are one branch of the residual stream, and e4m3 rounds each weight
by about 2.5% RMS); asserted mean < 2e-3 and max < 1e-2. Greedy: all 48 tokens equal in every
measured case; asserted: the first 8 tokens equal for at least 3 of the 4 prompts (a near-tie may
flip on another CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import make_tiny_llama, make_tokenizer

from posttrain.config.schema import GRPOConfig
from posttrain.engine import Engine
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.moe.fp8_experts import FP8Experts
from posttrain.models.moe.hf_blocks import use_grouped_experts
from posttrain.rollout import SamplingParams
from posttrain.rollout.builder import build_engine

TEXTS = ["What is 2+3?", "Hi", "A longer prompt here, long enough to span several blocks", "Count: 1 2 3"]
MEAN_TOLERANCE, MAX_TOLERANCE = 2e-3, 1e-2
CONFIGS = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 32, "num_local_experts": 4}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 32, "moe_intermediate_size": 32, "num_experts": 4,
                                     "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                     "head_dim": 16}),
}


def tiny_moe(family: str, tok, seed: int = 0) -> torch.nn.Module:
    config_name, moe = CONFIGS[family]
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **moe)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.max_length = None
    return model.eval()


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    tokens = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(tokens).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def engine(model, tok, expert_dtype: str) -> Engine:
    return Engine(model, tok, max_model_len=128, block_size=4, max_num_seqs=8, expert_dtype=expert_dtype)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fp8_experts_logprobs_and_greedy_stay_close_to_float32(family):
    tok = make_tokenizer()
    model = tiny_moe(family, tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=12, ignore_eos=True)
    full = [group[0] for group in engine(copy.deepcopy(model), tok, "auto").generate(prompts, params)]
    fp8_engine = engine(model, tok, "fp8")
    assert fp8_engine.fp8_experts is not None and len(fp8_engine.fp8_experts) == 2
    assert all(isinstance(e, FP8Experts) and e.gate_up.dtype == torch.float8_e4m3fn for e in fp8_engine.fp8_experts)
    fp8 = [group[0] for group in fp8_engine.generate(prompts, params)]

    # The fp8 engine's own logprobs against float32 experts on the same tokens.
    diffs = torch.cat([torch.tensor(c.logprobs) - teacher_forced_logprobs(model, c.prompt_token_ids, c.token_ids)
                       for c in fp8]).abs()
    assert 0 < diffs.mean() < MEAN_TOLERANCE and diffs.max() < MAX_TOLERANCE, (diffs.mean(), diffs.max())
    same_start = sum(a.token_ids[:8] == b.token_ids[:8] for a, b in zip(full, fp8))
    assert same_start >= 3, [(a.token_ids, b.token_ids) for a, b in zip(full, fp8)]
    # Outside the engine's steps the (shared) modules compute in full precision.
    plain = teacher_forced_logprobs(tiny_moe(family, tok), prompts[0], full[0].token_ids)
    torch.testing.assert_close(teacher_forced_logprobs(model, prompts[0], full[0].token_ids), plain,
                               atol=1e-5, rtol=1e-5)


def _dequantized_error(fp8: FP8Experts, gate_up: torch.Tensor) -> float:
    back, _ = fp8.dequantize()
    return float((back - gate_up).norm() / gate_up.norm())


def test_fp8_experts_follow_weight_updates():
    tok = make_tokenizer()
    model = tiny_moe("mixtral", tok)
    eng = engine(model, tok, "fp8")
    experts = use_grouped_experts(model).blocks[0].experts
    before = eng.fp8_experts[0]
    assert _dequantized_error(before, experts.gate_up_proj.detach()) < 0.03  # e4m3: about 2.5% RMS

    # Pushed tensors (sync.mode=broadcast/checkpoint, replicas): quantized from the new weights.
    name = next(n for n, p in model.named_parameters() if p is experts.gate_up_proj)
    new = torch.randn_like(experts.gate_up_proj) * 0.1
    eng.update_weights({name: new})
    assert _dequantized_error(eng.fp8_experts[0], new) < 0.03
    assert _dequantized_error(before, new) > 0.5

    # Shared modules (sync.mode=shared): the trainer steps them in place, the sync requantizes.
    with torch.no_grad():
        experts.gate_up_proj.mul_(-2.0)
    assert _dequantized_error(eng.fp8_experts[0], experts.gate_up_proj.detach()) > 0.5  # not before the sync
    eng.update_weights(None)
    assert _dequantized_error(eng.fp8_experts[0], experts.gate_up_proj.detach()) < 0.03
    out = eng.generate([[5, 6, 7]], SamplingParams(n=1, temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0][0].token_ids) == 4


def test_fp8_engine_refusals_and_config_wiring():
    tok = make_tokenizer()
    with pytest.raises(PosttrainError, match="nvfp4 experts are not implemented"):
        engine(tiny_moe("mixtral", tok), tok, "nvfp4")
    with pytest.raises(PosttrainError, match="expert_dtype=fp8 quantizes MoE experts, but LlamaForCausalLM has none"):
        engine(make_tiny_llama(tok), tok, "fp8")
    cfg = GRPOConfig()
    cfg.moe.expert_dtype = "fp8"  # (a run checks the GPU first; the engine itself runs anywhere)
    built = build_engine(cfg.rollout, tiny_moe("mixtral", tok), tok, torch.float32, max_model_len=64,
                         float32_logits=cfg.model.float32_logits, expert_dtype=cfg.moe.expert_dtype)
    assert built.expert_dtype == "fp8" and built.fp8_experts is not None and not built.runner.use_cuda_graphs


def test_serve_expert_dtype_reaches_the_engine(monkeypatch):
    from posttrain.cli import build_parser
    from posttrain.server import cli as server_cli

    tok = make_tokenizer()
    model = tiny_moe("mixtral", tok)
    args = build_parser().parse_args(["serve", "--expert-dtype", "fp8", "--max-model-len", "64"])
    with pytest.raises(ConfigError, match="--expert-dtype fp8 needs an NVIDIA GPU of compute capability 8.9.*CPU. "
                                          "Use --expert-dtype auto"):
        server_cli.build_serving_engine(args, model, tok, torch.float32)
    monkeypatch.setattr(server_cli, "check_expert_dtype", lambda *a, **k: None)  # as on an H100
    engine, _ = server_cli.build_serving_engine(args, model, tok, torch.float32)
    assert engine.expert_dtype == "fp8" and engine.fp8_experts is not None
    args = build_parser().parse_args(["serve", "--expert-dtype", "fp8", "--engine", "hf"])
    with pytest.raises(ConfigError, match="--expert-dtype fp8 needs posttrain's engine"):
        server_cli.build_serving_engine(args, model, tok, torch.float32)


def test_served_fp8_experts_follow_shared_weights_at_flush_cache():
    # sync.mode=shared across processes: the trainer steps the shared memory and calls /flush_cache.
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from posttrain.server.app import create_app

    tok = make_tokenizer()
    model = tiny_moe("mixtral", tok)
    eng = engine(model, tok, "fp8")
    experts = use_grouped_experts(model).blocks[0].experts
    with TestClient(create_app(eng, tok, "tiny")) as http:
        with torch.no_grad():
            experts.gate_up_proj.mul_(-2.0)
        assert http.post("/flush_cache").status_code == 200
    assert _dequantized_error(eng.fp8_experts[0], experts.gate_up_proj.detach()) < 0.03


def test_serve_refuses_fp8_experts_on_a_cpu_before_loading_the_model(monkeypatch, capsys):
    # `posttrain serve --expert-dtype fp8` on a CPU: exit 2 with serve's own option named, and no
    # model load first (minutes for a large model).
    pytest.importorskip("fastapi")
    from posttrain.cli import main
    from posttrain.server import cli as server_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server_cli, "load_model_and_tokenizer", no_load)
    assert main(["serve", "--expert-dtype", "fp8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "posttrain: config error: --expert-dtype fp8 needs an NVIDIA GPU" in err and "Use --expert-dtype auto" in err
    assert "moe.expert_dtype" not in err
