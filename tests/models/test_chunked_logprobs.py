import logging

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.models.chunked_logprobs import chunked_logprobs
from posttrain.models.logprobs import make_token_batch, response_logprobs

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [30, 31, 32, 33]]
RESPONSES = [[20, 21, 40, 41], [22, 23, 24, 25, 26, 27, 28], [29], [50, 51, 52, 53, 54, 55]]


def _setup(seed=0):
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=seed)
    batch = make_token_batch(PROMPTS, RESPONSES, tok.pad_token_id)
    return model, batch


def _loss(model, batch, chunk_size, temperature=0.7):
    logprobs, entropy = response_logprobs(
        model, batch, temperature=temperature, with_entropy=True, entropy_grad=True, chunk_size=chunk_size
    )
    mask = batch.response_mask
    weights = torch.linspace(-1.0, 2.0, mask.numel()).reshape(mask.shape)
    loss = (weights * logprobs * mask).sum() - 0.3 * (entropy * mask).sum()
    return loss, logprobs, entropy


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])  # 17 response tokens: 3 and 5 do not divide it
def test_values_and_gradients_match_plain_path(chunk_size):
    model, batch = _setup()
    mask = batch.response_mask.bool()
    loss_ref, lp_ref, ent_ref = _loss(model, batch, 0)
    loss_ref.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, lp, ent = _loss(model, batch, chunk_size)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(lp[mask], lp_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[mask], ent_ref[mask], rtol=1e-5, atol=1e-5)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_entropy_detached_unless_entropy_grad_and_no_grad_works():
    model, batch = _setup()
    logprobs, entropy = response_logprobs(model, batch, with_entropy=True, chunk_size=4)
    assert logprobs.requires_grad and not entropy.requires_grad
    with torch.no_grad():
        lp2, none = response_logprobs(model, batch, chunk_size=4)
    assert none is None and not lp2.requires_grad
    torch.testing.assert_close(lp2, logprobs.detach())


def test_function_with_bias_matches_dense_autograd():
    torch.manual_seed(0)
    N, H, V = 11, 6, 13
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    lp, ent = chunked_logprobs(h, w, y, bias=b, temperature=1.3, chunk_size=4, with_entropy=True)
    logits = (h @ w.t() + b) / 1.3
    logp = logits.log_softmax(-1)
    lp_ref = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logp.exp() * logp).sum(-1)
    # The outputs are float32 (by design); the reference is float64 dense autograd.
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-5)
    g1, g2 = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    got = torch.autograd.grad((lp.double() * g1).sum() + (ent.double() * g2).sum(), (h, w, b))
    ref = torch.autograd.grad((lp_ref * g1).sum() + (ent_ref * g2).sum(), (h, w, b))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_peft_lora_model_matches_plain_path():
    from posttrain.config.schema import LoRAConfig
    from posttrain.models.lora import apply_lora

    model, batch = _setup()
    model = apply_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():  # B = 0 at init: make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    mask = batch.response_mask.bool()
    loss_ref, lp_ref, ent_ref = _loss(model, batch, 0)
    loss_ref.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, lp, ent = _loss(model, batch, 3)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(lp[mask], lp_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[mask], ent_ref[mask], rtol=1e-5, atol=1e-5)
    assert ref and set(got) == set(ref) and all("lora_" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
    with model.disable_adapter():  # the reference model: base weights only
        lp_base, _ = response_logprobs(model, batch, chunk_size=3)
        lp_base_ref, _ = response_logprobs(model, batch, chunk_size=0)
    torch.testing.assert_close(lp_base[mask], lp_base_ref[mask], rtol=1e-5, atol=1e-5)


def _saved_shapes(model, batch, chunk_size):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = _loss(model, batch, chunk_size)
    loss.backward()
    return shapes


def test_graph_saves_no_tokens_by_vocab_tensor():
    model, batch = _setup()
    V = model.config.vocab_size
    n_tokens = int(batch.response_mask.sum())
    chunk = 2
    assert n_tokens * V > 4 * chunk * V
    # The plain path keeps (tokens, V) logits alive for backward; the check below can see them.
    plain = _saved_shapes(model, batch, 0)
    assert any(V in s and torch.Size(s).numel() >= n_tokens * V for s in plain)
    # Chunked: the only saved tensor with a vocabulary dim is the head weight (V, H); logits are recomputed.
    for s in _saved_shapes(model, batch, chunk):
        assert V not in s or s == (V, model.config.hidden_size), s


def test_softcapped_model_falls_back_to_plain_path(caplog):
    model, batch = _setup()
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; only the fallback is under test
    with caplog.at_level(logging.INFO, logger="posttrain.models"):
        lp, _ = response_logprobs(model, batch, chunk_size=2)
        response_logprobs(model, batch, chunk_size=2)
    assert sum("final_logit_softcapping" in r.getMessage() for r in caplog.records) == 1  # logged once
    # The plain path's padded entries are not zeroed, unlike the chunked path's.
    lp_plain, _ = response_logprobs(model, batch)
    torch.testing.assert_close(lp, lp_plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_autocast_close_to_plain_path(dtype):
    model, batch = _setup()
    mask = batch.response_mask.bool()
    with torch.autocast("cpu", dtype=dtype):
        loss_ref, lp_ref, _ = _loss(model, batch, 0)
        loss, lp, _ = _loss(model, batch, 3)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp[mask], lp_ref[mask], rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.slow  # compiling on the CPU takes ~15 s
@pytest.mark.timeout(900)
def test_compiled_chunk_functions_match_eager(monkeypatch):
    """On a GPU the per-chunk element-wise functions run compiled; forced here on the CPU."""
    import posttrain.models.chunked_logprobs as chunked

    torch.manual_seed(0)
    N, H, V = 11, 6, 13
    h, w, b = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    y = torch.randint(0, V, (N,))
    g1, g2 = torch.randn(N), torch.randn(N)

    def run():
        params = [t.clone().requires_grad_() for t in (h, w, b)]
        lp, ent = chunked_logprobs(params[0], params[1], y, bias=params[2], temperature=1.3, chunk_size=4,
                                   with_entropy=True)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        return [lp.detach(), ent.detach()] + [p.grad for p in params]

    eager = run()
    monkeypatch.setattr(chunked, "COMPILE_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(chunked, "_compiled", {})
    compiled_calls = []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        compiled_calls.append(fn.__name__)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    for got, want in zip(run(), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled_calls == ["chunk_stats", "chunk_logit_grad"]
    assert all(fn is not False for fn in chunked._compiled.values())  # compiled, not fallen back to eager


def test_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    import posttrain.models.chunked_logprobs as chunked

    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no compiler here")
        return fail

    model, batch = _setup()
    expected, _ = _loss(model, batch, 4)[1:]
    monkeypatch.setattr(chunked, "COMPILE_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(chunked, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    loss, got, _ = _loss(model, batch, 4)
    loss.backward()  # the backward's function falls back too
    torch.testing.assert_close(got, expected)
    assert "compiling chunk_stats failed (RuntimeError: no compiler here)" in caplog.text
    assert "compiling chunk_logit_grad failed" in caplog.text


@pytest.mark.parametrize("use_bias", [False, True])
def test_float32_logits_match_float32_math_on_16bit_operands(use_bias):
    """float32_logits: the 16-bit operands' exact products summed and kept in float32, forward and
    backward; without it the logits are rounded to bf16 first, which this data makes visible."""
    torch.manual_seed(0)
    N, H, V = 9, 16, 37
    h = (torch.randn(N, H) * 3).bfloat16()
    w = torch.randn(V, H).bfloat16()
    b = torch.randn(V).bfloat16() if use_bias else None
    y = torch.randint(0, V, (N,))
    g1, g2 = torch.randn(N), torch.randn(N)

    def run(fn):
        params = [t.clone().requires_grad_() for t in (h, w) + ((b,) if use_bias else ())]
        lp, ent = fn(*params)
        grads = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), params)
        return lp.detach(), ent.detach(), grads

    def reference(hh, ww, bb=None):
        logits = hh.float() @ ww.float().t() + (bb.float() if bb is not None else 0.0)
        logp = (logits / 0.9).log_softmax(-1)
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def chunked(hh, ww, bb=None, **kw):
        return chunked_logprobs(hh, ww, y, bias=bb, temperature=0.9, chunk_size=4, with_entropy=True, **kw)

    lp_ref, ent_ref, grads_ref = run(reference)
    lp, ent, grads = run(lambda *p: chunked(*p, float32_logits=True))
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):  # bf16, as the weights: the logit gradient is rounded once
        assert got.dtype == torch.bfloat16
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2 * scale)
    lp_rounded, _, _ = run(lambda *p: chunked(*p))
    assert (lp_rounded - lp_ref).abs().max() > 1e-3  # |logits| ~ 12 here: bf16 steps of 1/16


def test_response_logprobs_float32_logits_without_chunking_takes_one_chunk():
    model, batch = _setup()
    mask = batch.response_mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_one, _ = response_logprobs(model, batch, chunk_size=0, float32_logits=True)
        lp_chunked, _ = response_logprobs(model, batch, chunk_size=3, float32_logits=True)
    torch.testing.assert_close(lp_one[mask], lp_chunked[mask])


def test_auto_chunk_is_the_largest_power_of_two_whose_logits_fit_the_gpus_memory():
    from posttrain.models.chunked_logprobs import auto_chunk_size

    GB = 1e9
    assert auto_chunk_size(151_936, 4, 85 * GB, 80 * GB) == 8192  # Qwen vocabulary, 80 GB H100: 5.0 GB of logits
    assert auto_chunk_size(49_152, 4, 85 * GB, 80 * GB) == 8192  # capped at the largest measured chunk
    assert auto_chunk_size(151_936, 4, 25.7 * GB, 24 * GB) == 2048  # a 24 GB card
    assert auto_chunk_size(151_936, 4, 85 * GB, 10 * GB) == 4096  # little free memory: 1/4 of it
    assert auto_chunk_size(151_936, 2, 25.7 * GB, 24 * GB) == 4096  # bf16 logits take half as much
    assert auto_chunk_size(10**7, 4, 8 * GB, 1 * GB) == 1024  # never below 1024


def test_auto_chunk_on_cpu_gives_the_cpu_chunk_and_the_same_logprobs():
    from posttrain.models.chunked_logprobs import CPU_CHUNK, resolve_chunk_size

    assert resolve_chunk_size("auto", 151_936, torch.device("cpu"), 4) == CPU_CHUNK
    assert resolve_chunk_size(5, 151_936, torch.device("cpu"), 4) == 5
    assert resolve_chunk_size(0, 151_936, torch.device("cpu"), 4) == 0
    model, batch = _setup()
    auto = response_logprobs(model, batch, chunk_size="auto")[0]
    fixed = response_logprobs(model, batch, chunk_size=CPU_CHUNK)[0]
    assert torch.equal(auto, fixed)


@pytest.mark.parametrize("value,ok", [("auto", True), ("2048", True), ("0", True), ("-1", False), ("big", False)])
def test_chunked_logprobs_accepts_auto_or_a_token_count(value, ok):
    from posttrain.config.loader import load_config
    from posttrain.config.schema import GRPOConfig
    from posttrain.errors import ConfigError

    if ok:
        cfg = load_config(GRPOConfig, None, [f"model.chunked_logprobs={value}"])
        assert cfg.model.chunked_logprobs == (value if value == "auto" else int(value))
    else:
        with pytest.raises(ConfigError, match="model.chunked_logprobs=.* is not a chunk size; use auto"):
            load_config(GRPOConfig, None, [f"model.chunked_logprobs={value}"])
