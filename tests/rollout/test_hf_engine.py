import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.rollout.hf_engine import HFEngine


def _setup(seed=0):
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=seed)
    model.generation_config.max_length = None
    prompts = [tok(t, add_special_tokens=False).input_ids for t in ["What is 2+3?", "Hi", "A longer prompt here"]]
    return tok, model, prompts, HFEngine(model, tok, generation_batch_size=2)


def test_engine_implements_protocol_and_greedy_matches_transformers():
    tok, model, prompts, engine = _setup()
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=10))
    for prompt, [completion] in zip(prompts, out):
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert completion.token_ids == ref
        assert completion.prompt_token_ids == prompt
        assert completion.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
        assert completion.text == tok.decode(ref, skip_special_tokens=True)


def test_n_samples_per_prompt_with_logprobs_equal_to_trainer_forward():
    tok, model, prompts, engine = _setup()
    params = SamplingParams(n=3, temperature=0.8, top_k=20, top_p=0.95, max_tokens=8, seed=123)
    out = engine.generate(prompts, params)
    assert [len(group) for group in out] == [3, 3, 3]
    completions = [c for group in out for c in group]
    batch = make_token_batch([c.prompt_token_ids for c in completions], [c.token_ids for c in completions], tok.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature=0.8)
    for i, c in enumerate(completions):
        assert len(c.logprobs) == len(c.token_ids) > 0
        torch.testing.assert_close(torch.tensor(c.logprobs), logprobs[i, : len(c.token_ids)], rtol=1e-4, atol=1e-4)
    # the same seed reproduces the same samples
    again = engine.generate(prompts, params)
    assert [c.token_ids for g in again for c in g] == [c.token_ids for c in completions]


def test_stop_strings_cut_the_completion_and_report_stop():
    tok, model, prompts, engine = _setup()
    free = engine.generate(prompts[:1], SamplingParams(n=1, temperature=0.0, max_tokens=12))[0][0]
    assert len(free.token_ids) >= 4
    stop = tok.decode(free.token_ids[2:4])  # a string the greedy continuation is known to produce
    cut = engine.generate(prompts[:1], SamplingParams(n=1, temperature=0.0, max_tokens=12, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop"
    assert stop in tok.decode(cut.token_ids)
    assert stop not in tok.decode(cut.token_ids[:-1])
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]


def test_generation_restores_training_mode_and_update_weights_is_a_noop():
    tok, model, prompts, engine = _setup()
    model.train()
    engine.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_tokens=3, logprobs=False))
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.update_weights()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
