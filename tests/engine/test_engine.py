import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from helpers import make_tiny_llama, make_tokenizer
from posttrain.engine import Engine
from posttrain.errors import PosttrainError
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.rollout import RolloutEngine, SamplingParams

TEXTS = ["What is 2+3?", "Hi", "A longer prompt here, long enough to span several blocks", "What is 2+3?"]


def _tiny(family: str, tok, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        return make_tiny_llama(tok, seed=seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    model.generation_config.max_length = None
    return model.eval()


def _reference_greedy(model, tok, prompt, max_new_tokens):
    ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[: ref.index(tok.eos_token_id) + 1]
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers_for_each_family(family):
    tok = make_tokenizer()
    model = _tiny(family, tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    engine = Engine(model, tok, max_model_len=160, block_size=4, max_num_seqs=8)
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=24))
    for prompt, group in zip(prompts, out):
        ref = _reference_greedy(model, tok, prompt, 24)
        for completion in group:
            assert completion.prompt_token_ids == prompt
            assert completion.token_ids == ref
            assert completion.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
            assert completion.text == tok.decode(ref, skip_special_tokens=True)
    # The two samples of each prompt and the repeated prompt shared full prompt blocks.
    assert engine.stats()["engine/prefix_cache_hit_tokens"] > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sampled_logprobs_equal_trainer_forward(family):
    tok = make_tokenizer()
    model = _tiny(family, tok, seed=1)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    engine = Engine(model, tok, max_model_len=160, block_size=8)
    params = SamplingParams(n=3, temperature=0.7, top_k=30, top_p=0.9, max_tokens=16, seed=5)
    completions = [c for group in engine.generate(prompts, params) for c in group]
    batch = make_token_batch([c.prompt_token_ids for c in completions], [c.token_ids for c in completions], tok.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature=0.7)
    for i, c in enumerate(completions):
        assert len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), logprobs[i, : len(c.token_ids)], atol=1e-4, rtol=0)


def test_preemption_when_blocks_run_out_gives_the_same_outputs():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS] * 3
    params = SamplingParams(n=2, temperature=0.0, max_tokens=30)
    roomy = Engine(model, tok, max_model_len=128, block_size=4, max_num_seqs=32)
    expected = [[c.token_ids for c in g] for g in roomy.generate(prompts, params)]
    # Room for only a few sequences at a time: running sequences are preempted and recomputed.
    d = roomy.runner.decoder
    bytes_per_block = 2 * d.num_layers * 4 * d.num_kv_heads * d.head_dim * 4
    tight = Engine(model, tok, max_model_len=128, block_size=4, max_num_seqs=32, cpu_kv_cache_gb=40 * bytes_per_block / 2**30)
    assert tight.runner.num_blocks == 40
    got = [[c.token_ids for c in g] for g in tight.generate(prompts, params)]
    assert got == expected
    assert tight.stats()["engine/preemptions"] > 0


def test_stop_strings_stop_token_ids_ignore_eos_and_length_limit():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    prompt = tok("What is 2+3?", add_special_tokens=False).input_ids
    engine = Engine(model, tok, max_model_len=64, block_size=4)
    [[free]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    # A stop string taken from the middle of the free-running text ends the completion right there.
    text = tok.decode(free.token_ids[:8])
    stop = text[-2:]
    [[stopped]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=[stop], ignore_eos=True))
    assert stopped.finish_reason == "stop"
    assert stop in tok.decode(stopped.token_ids)
    assert stop not in tok.decode(stopped.token_ids[:-1])
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.logprobs) == len(stopped.token_ids)
    # A stop token id ends the completion and is kept, like EOS.
    target = free.token_ids[5]
    [[by_id]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[target], ignore_eos=True))
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(target) + 1] and by_id.finish_reason == "stop"
    # max_tokens is clamped to what max_model_len leaves; a prompt that does not fit is an error.
    [[clamped]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
    assert len(prompt) + len(clamped.token_ids) == 64 and clamped.finish_reason == "length"
    with pytest.raises(PosttrainError, match="max_model_len"):
        engine.generate([[5] * 64], SamplingParams(max_tokens=1))


def test_seeded_requests_are_reproducible_and_top_logprobs_reported():
    tok = make_tokenizer()
    model = _tiny("qwen2", tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS[:2]]
    engine = Engine(model, tok, max_model_len=64, block_size=4)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=7, top_logprobs=3)
    first = engine.generate(prompts, params)
    # Same seed, different batch company: same samples.
    second = engine.generate(prompts[:1] + [[9, 9, 9]], params)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in second[0]]
    assert first[0][0].token_ids != first[0][1].token_ids or len(first[0][0].token_ids) < 3
    c = first[0][0]
    assert len(c.top_logprobs) == len(c.token_ids)
    for lp, top in zip(c.logprobs, c.top_logprobs):
        assert len(top) == 3 and max(top.values()) >= lp - 1e-6


def test_sleep_frees_the_cache_and_wake_restores_generation():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    engine = Engine(model, tok, max_model_len=96, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    before = engine.generate(prompts, params)
    engine.sleep()
    assert engine.runner.kv_cache is None and not engine.is_awake
    engine.wake()
    assert [[c.token_ids for c in g] for g in engine.generate(prompts, params)] == [[c.token_ids for c in g] for g in before]


def test_weight_update_in_place_invalidates_cached_prefixes():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    prompt = tok(TEXTS[2], add_special_tokens=False).input_ids
    engine = Engine(model, tok, max_model_len=96, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    engine.generate([prompt], params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.update_weights()  # shared modules: nothing moves, cached prefixes are dropped
    [[after]] = engine.generate([prompt], params)
    assert after.token_ids == _reference_greedy(model, tok, prompt, 12)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(PosttrainError, match="rollout.backend=hf"):
        Engine(model, tok, max_model_len=32)


def test_generation_runs_in_eval_mode_and_leaves_train_mode_alone():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    model.config.attention_dropout = 0.0
    prompt = tok(TEXTS[0], add_special_tokens=False).input_ids
    engine = Engine(model, tok, max_model_len=64, block_size=4)
    modes = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))
    handle.remove()
    assert modes and not any(modes) and model.training


def test_cpu_bf16_rollouts_restore_the_fp32_weights_untouched():
    tok = make_tokenizer()
    model = _tiny("qwen3", tok)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    engine = Engine(model, tok, max_model_len=96, block_size=4, cpu_dtype=torch.bfloat16)
    completions = [c for g in engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=1)) for c in g]
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    assert engine.runner.kv_dtype == torch.bfloat16
    batch = make_token_batch([c.prompt_token_ids for c in completions], [c.token_ids for c in completions], tok.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature=1.0)
    diffs = torch.cat([(torch.tensor(c.logprobs) - logprobs[i, : len(c.token_ids)]).abs() for i, c in enumerate(completions)])
    assert diffs.mean() < 0.05  # bf16 rounding, not a different model


def test_a_failing_compiled_layer_falls_back_to_eager_for_good(caplog):
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    prompt = tok(TEXTS[0], add_special_tokens=False).input_ids
    engine = Engine(model, tok, max_model_len=64, block_size=4)
    [[expected]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))

    def broken(*args):
        raise RuntimeError("inductor: unsupported op")

    engine.runner.use_compile = True  # as on a GPU, with a compiled function that cannot run
    engine.runner.decoder._before_attention = broken
    [[got]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))
    assert got.token_ids == expected.token_ids
    assert not engine.runner.use_compile and "running them eagerly" in caplog.text


def test_a_kv_budget_too_small_for_one_sequence_names_the_setting():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    with pytest.raises(PosttrainError, match="cpu_kv_cache_gb"):
        Engine(model, tok, max_model_len=4096, block_size=4, cpu_kv_cache_gb=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float32_logits_from_a_16bit_head(family, monkeypatch):
    """model.float32_logits: the head's bf16 operands multiplied and summed in float32, not rounded
    back to bf16 (as the trainer's chunked logprobs compute them); off, the head's own output.
    The engine does this on GPUs only; the math is checked here on the CPU."""
    from posttrain.engine import paged_model
    from posttrain.engine.paged_model import PagedDecoder

    monkeypatch.setattr(paged_model, "FLOAT32_LOGITS_DEVICE_TYPES", {"cuda", "cpu"})
    tok = make_tokenizer()
    model = _tiny(family, tok).to(torch.bfloat16)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(len(tok)).bfloat16()) if family == "qwen2" else None
    hidden = (torch.randn(5, model.config.hidden_size) * 4).bfloat16()
    head = model.lm_head
    want = hidden.float() @ head.weight.float().t() + (head.bias.float() if head.bias is not None else 0.0)
    got = PagedDecoder(model).logits(hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    rounded = PagedDecoder(model, float32_logits=False).logits(hidden)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, head(hidden))
    monkeypatch.setattr(paged_model, "FLOAT32_LOGITS_DEVICE_TYPES", {"cuda"})
    assert torch.equal(PagedDecoder(model).logits(hidden), head(hidden))  # CPU rollouts: the head's own


def test_generate_switches_train_mode_once_per_call_not_per_step(monkeypatch):
    """A trainer's modules are in train mode; the engine samples in eval mode (no dropout) and
    gives them back in train mode. The switch walks every module, so it happens once per call."""
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    engine = Engine(model, tok, max_model_len=64, block_size=4)
    model.train()
    calls = []
    original = torch.nn.Module.train

    def counting_train(self, mode=True):
        if self is model:
            calls.append(mode)
        return original(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", counting_train)
    dropout_modes = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda module, args: dropout_modes.append(module.training))
    prompt = tok(TEXTS[0], add_special_tokens=False).input_ids
    [[completion]] = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    assert len(completion.token_ids) == 12 and len(dropout_modes) >= 12  # a step per token
    assert calls == [False, True] and not any(dropout_modes) and model.training
