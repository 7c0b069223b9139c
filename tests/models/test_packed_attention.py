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


# -- sdpa_varlen: flash attention's varlen kernel for packed passes (CUDA); sdpa otherwise --------


def per_document_attention(q, k, v, cu_seqlens, max_len, scale):
    """A CPU stand-in for the CUDA varlen kernel with its contract: (tokens, heads, dim), causal
    within each document of ``cu_seqlens``, grouped-query heads."""
    assert q.dim() == 3 and cu_seqlens.dtype == torch.int32 and int(cu_seqlens[-1]) == q.shape[0]
    assert max_len == int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    outs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def varlen(monkeypatch):
    """A tiny Llama on sdpa_varlen with the kernel replaced by the CPU stand-in, and the calls it gets."""
    base = make_tiny_llama(make_tokenizer())
    base.config.num_key_value_heads = 2  # grouped-query heads, as in Qwen2.5
    base = type(base)(base.config).eval()
    hybrid = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), attn_implementation="sdpa_varlen").eval()
    hybrid.load_state_dict(base.state_dict())
    calls = []

    def kernel(q, k, v, cu_seqlens, max_len, scale):
        calls.append(cu_seqlens.tolist())
        return per_document_attention(q, k, v, cu_seqlens, max_len, scale)

    monkeypatch.setattr(packed_attention, "VARLEN_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(packed_attention, "VARLEN_DTYPES", (torch.float32,))  # the stand-in has float32
    monkeypatch.setattr(packed_attention, "_kernel", kernel)
    return base, hybrid, calls


def test_document_boundaries_of_packed_rows():
    # Two rows: documents of 3 and 2 tokens, then padding (a document of its own); 4 and 1 tokens.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    cu_seqlens, longest = packed_attention.document_boundaries(position_ids)
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 11, 12] and cu_seqlens.dtype == torch.int32 and longest == 4
    host = packed_attention.varlen_kwargs(position_ids.numpy())  # the same, in numpy on the host
    assert host["cu_seq_lens_q"].tolist() == cu_seqlens.tolist() and host["cu_seq_lens_q"].dtype == torch.int32
    assert host["max_length_q"] == 4


def test_varlen_packed_pass_matches_padded_sdpa_forward_and_backward(varlen):
    base, hybrid, calls = varlen
    padded = make_token_batch(PROMPTS, RESPONSES, 0)
    mask = padded.response_mask.bool()
    expected, _ = response_logprobs(base, padded, chunk_size=4)
    expected[mask].sum().backward()
    for layout in ([[0, 1, 2]], [[0, 2], [1]]):  # one row; two rows (the second right-padded)
        hybrid.zero_grad()
        calls.clear()
        batch = make_packed_token_batch(PROMPTS, RESPONSES, 0, rows=layout)
        packed, _ = response_logprobs(hybrid, batch, chunk_size=4)
        assert len(calls) == hybrid.config.num_hidden_layers  # every layer, boundaries from the batch
        assert calls[0] == batch.document_kwargs["cu_seq_lens_q"].tolist()
        torch.testing.assert_close(packed[mask], expected[mask], rtol=1e-5, atol=1e-5)
        packed[mask].sum().backward()
        for (name, p), q in zip(base.named_parameters(), hybrid.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@torch.no_grad()
def test_varlen_without_keywords_reads_the_position_ids_and_generation_stays_on_sdpa(varlen):
    base, hybrid, calls = varlen
    batch = make_packed_token_batch(PROMPTS, RESPONSES, 0)
    out = hybrid(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits  # no keywords
    assert calls and calls[0] == batch.document_kwargs["cu_seq_lens_q"].tolist()
    ref = base(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits  # sdpa, dense mask
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    calls.clear()
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(hybrid.generate(prompt, max_new_tokens=4, do_sample=False),
                       base.generate(prompt, max_new_tokens=4, do_sample=False))
    padded = make_token_batch(PROMPTS, RESPONSES, 0)
    hybrid(input_ids=padded.input_ids, attention_mask=padded.attention_mask)
    assert not calls  # a KV cache or a padding mask: sdpa


def test_varlen_is_only_for_plain_causal_models():
    config = make_tiny_llama(make_tokenizer()).config
    assert packed_attention.varlen_applies(config)
    config.model_type = "gemma2"
    assert not packed_attention.varlen_applies(config)
    config.model_type, config.sliding_window, config.use_sliding_window = "qwen2", 4096, True
    assert not packed_attention.varlen_applies(config)
    config.use_sliding_window = False
    assert packed_attention.varlen_applies(config)


@torch.no_grad()
def test_varlen_casts_autocast_float32_inputs_and_leaves_float32_passes_to_sdpa(varlen, monkeypatch):
    base, hybrid, calls = varlen
    seen = []

    def kernel(q, k, v, cu_seqlens, max_len, scale):
        seen.append({q.dtype, k.dtype, v.dtype})
        return per_document_attention(q.float(), k.float(), v.float(), cu_seqlens, max_len, scale).to(q.dtype)

    monkeypatch.setattr(packed_attention, "_kernel", kernel)
    monkeypatch.setattr(packed_attention, "VARLEN_DTYPES", (torch.bfloat16,))
    batch = make_packed_token_batch(PROMPTS, RESPONSES, 0)
    response_logprobs(hybrid, batch, chunk_size=4)  # float32, no autocast: no flash kernel for it
    assert not seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        response_logprobs(hybrid, batch, chunk_size=4)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)


def test_packed_batches_hand_transformers_their_document_ids_from_the_host(monkeypatch):
    """transformers' own search for packed documents reads a device value (a sync per forward
    pass); a packed batch brings the same ids, computed on the host, for its position ids."""
    import transformers.masking_utils as masking_utils

    model = make_tiny_llama(make_tokenizer()).eval()
    batch = make_packed_token_batch(PROMPTS, RESPONSES, 0, rows=[[0, 2], [1]])
    searched = []
    original = packed_attention._find_packed_sequence_indices
    monkeypatch.setattr(packed_attention, "_find_packed_sequence_indices",
                        lambda position_ids: searched.append(position_ids) or original(position_ids))
    assert masking_utils.find_packed_sequence_indices is packed_attention._find_known_packed_sequence_indices
    torch.testing.assert_close(batch.document_ids, original(batch.position_ids))
    assert batch.document_ids.tolist() == [[0] * 8 + [1] * 4, [0] * 7 + [1] * 5]  # padding: a document of its own
    with torch.no_grad():
        for chunk_size in (0, 4):
            lp, _ = response_logprobs(model, batch, chunk_size=chunk_size)
            assert searched == []  # not searched again
            no_ids = copy.copy(batch)
            no_ids.document_ids = None
            lp_searched, _ = response_logprobs(model, no_ids, chunk_size=chunk_size)
            assert len(searched) == 1 and searched.pop() is batch.position_ids
            torch.testing.assert_close(lp, lp_searched, rtol=0, atol=0)
    assert packed_attention._known_documents is None  # only while the forward pass runs
    # Any other tensor is searched as before, even while a batch's ids are known.
    other = batch.position_ids.clone()
    with packed_attention.known_documents(batch.position_ids, batch.document_ids):
        assert masking_utils.find_packed_sequence_indices(batch.position_ids) is batch.document_ids
        torch.testing.assert_close(masking_utils.find_packed_sequence_indices(other), batch.document_ids)
        assert searched == [other]


def traceable_per_document_attention(q, k, v, cu_seqlens, max_len, scale):
    """The stand-in's contract in torch ops only (a dense per-document causal mask), so torch.compile
    traces it as it traces the real kernel's aten op."""
    T = q.shape[0]
    positions = torch.arange(T)
    document = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    mask = (document[:, None] == document[None, :]) & (positions[:, None] >= positions[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def test_compiled_layers_trace_the_varlen_path_in_one_graph(varlen, monkeypatch):
    # trainer.compile_layers compiles each decoder layer; a graph break in the attention function's
    # Python (the varlen dispatch, dtype choice, boundaries) would split every layer's graph in two
    # on the GPU. fullgraph=True turns any break into an error here.
    base, hybrid, calls = varlen
    monkeypatch.setattr(packed_attention, "_kernel", traceable_per_document_attention)
    padded = make_token_batch(PROMPTS, RESPONSES, 0)
    mask = padded.response_mask.bool()
    expected, _ = response_logprobs(hybrid, make_packed_token_batch(PROMPTS, RESPONSES, 0), chunk_size=4)
    for layer in hybrid.model.layers:
        layer.compile(backend="eager", dynamic=True, fullgraph=True)
    for layout in ([[0, 1, 2]], [[0, 2], [1]]):  # two shapes: the dynamic graph is reused
        batch = make_packed_token_batch(PROMPTS, RESPONSES, 0, rows=layout)
        packed, _ = response_logprobs(hybrid, batch, chunk_size=4)
        torch.testing.assert_close(packed[mask], expected[mask], rtol=1e-5, atol=1e-5)
        packed[mask].sum().backward()
