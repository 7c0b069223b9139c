"""attn_implementation=sdpa_flex: flex for packed full passes, sdpa for padded passes and generation."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import posttrain.models.packed_attention as packed_attention
from helpers import make_tiny_llama, make_tokenizer
from posttrain.models.logprobs import make_packed_token_batch, make_token_batch, response_logprobs

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
RESPONSES = [[20, 21, 40], [22, 23, 24, 25, 26], [29]]


@pytest.fixture
def models():
    base = make_tiny_llama(make_tokenizer())
    hybrid = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), attn_implementation="sdpa_flex")
    hybrid.load_state_dict(base.state_dict())
    return base.eval(), hybrid.eval()


@pytest.fixture
def flex_calls(monkeypatch):
    calls = []
    original = packed_attention.flex_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "flex_attention_forward", counting)
    return calls


@torch.no_grad()
def test_packed_pass_uses_flex_and_matches_sdpa(models, flex_calls, monkeypatch):
    base, hybrid = models
    assert hybrid.config._attn_implementation == "sdpa_flex"
    monkeypatch.setattr(packed_attention, "FLEX_DEVICE_TYPES", {"cpu"})  # flex runs forward-only on CPU
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # eager flex: same values, no 10 s compile
    expected, _ = response_logprobs(base, make_token_batch(PROMPTS, RESPONSES, 0), chunk_size=4)
    packed, _ = response_logprobs(hybrid, make_packed_token_batch(PROMPTS, RESPONSES, 0), chunk_size=4)
    assert len(flex_calls) == hybrid.config.num_hidden_layers
    mask = make_token_batch(PROMPTS, RESPONSES, 0).response_mask.bool()
    torch.testing.assert_close(packed[mask], expected[mask], rtol=1e-5, atol=1e-5)
    # Padded rows (an attention mask) and generation (a KV cache) stay on sdpa.
    padded, _ = response_logprobs(hybrid, make_token_batch(PROMPTS, RESPONSES, 0), chunk_size=4)
    prompt = torch.tensor([[5, 6, 7]])
    generated = hybrid.generate(prompt, max_new_tokens=4, do_sample=False)
    assert len(flex_calls) == hybrid.config.num_hidden_layers
    torch.testing.assert_close(padded, expected)
    assert torch.equal(generated, base.generate(prompt, max_new_tokens=4, do_sample=False))


def test_on_cpu_packed_training_uses_sdpa(models, flex_calls):
    base, hybrid = models
    logprobs, _ = response_logprobs(hybrid.train(), make_packed_token_batch(PROMPTS, RESPONSES, 0), chunk_size=4)
    logprobs.sum().backward()  # flex has no CPU backward: the CPU path must not pick it
    assert not flex_calls
