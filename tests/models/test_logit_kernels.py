"""The one-pass Triton kernels against the torch functions they replace.

Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the host), when
Triton is installed; the fallback test needs no Triton."""

import pytest
import torch

import posttrain.models.chunked_logprobs as chunked
from posttrain.models import logit_kernels
from posttrain.models.chunked_logprobs import chunk_logit_grad, chunk_stats, chunked_logprobs


@pytest.fixture
def kernels(monkeypatch):
    """The device the kernels run on (interpreted on the host without a GPU: see conftest.py)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setitem(chunked._KERNELS_OK, device, True)
    return torch.device(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_kernels_match_torch_functions(kernels, dtype, temperature, with_entropy):
    torch.manual_seed(0)
    n, vocab = 6, logit_kernels.BLOCK + 1234  # a partial last block
    logits = (torch.randn(n, vocab, device=kernels) * 4).to(dtype)
    logits[0, 7] = 60.0  # a peaked row: the running maximum must rescale the sums
    targets = torch.randint(0, vocab, (n,), device=kernels)
    targets[0] = 7
    want = chunk_stats(logits, None, targets, temperature, with_entropy)
    got = (torch.empty(n, device=kernels), torch.empty(n, device=kernels), torch.zeros(n, device=kernels))
    logit_kernels.chunk_stats(logits, targets, temperature, with_entropy, got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)

    grad_lp = torch.randn(n, device=kernels)
    grad_entropy = torch.randn(n, device=kernels) if with_entropy else None
    lse, entropy = want[1], want[2]
    want_grad, _ = chunk_logit_grad(logits, None, targets, lse, entropy, grad_lp, grad_entropy, temperature, dtype)
    buffer = logits.clone()
    got_grad = logit_kernels.chunk_logit_grad_(buffer, targets, lse, entropy, grad_lp, grad_entropy, temperature)
    assert got_grad.data_ptr() == buffer.data_ptr() and got_grad.dtype == dtype  # in place
    # float32: (1 - p) at the peaked target cancels to rounding noise of log p at |z / T| = 100;
    # bf16: both round the same float32 value and may differ by one unit in the last place.
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, **tol)


def test_chunked_logprobs_with_kernels_match_torch_path(kernels):
    torch.manual_seed(1)
    n, hidden, vocab = 23, 8, 700
    h, w = torch.randn(n, hidden, device=kernels), torch.randn(vocab, hidden, device=kernels) * 0.3
    targets = torch.randint(0, vocab, (n,), device=kernels)
    weights = torch.linspace(-1, 2, n, device=kernels)

    def run():
        params = [t.clone().requires_grad_() for t in (h, w)]
        lp, ent = chunked_logprobs(*params, targets, temperature=0.8, chunk_size=5, with_entropy=True)
        ((lp * weights).sum() - 0.3 * ent.sum()).backward()
        return [lp.detach(), ent.detach()] + [p.grad for p in params]

    with_kernels = run()
    chunked._KERNELS_OK[kernels.type] = False
    for got, want in zip(with_kernels, run()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_failing_kernel_falls_back_to_torch(monkeypatch, caplog):
    """A kernel that cannot compile (an old Triton, a driver problem) costs a warning, not the run."""
    torch.manual_seed(2)
    h, w = torch.randn(9, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    want_lp, _ = chunked_logprobs(h, w, targets, chunk_size=4)
    want_grads = torch.autograd.grad(want_lp.sum(), (h, w))

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new for this driver")

    monkeypatch.setitem(chunked._KERNELS_OK, "cpu", True)
    monkeypatch.setattr(logit_kernels, "chunk_stats", broken)
    monkeypatch.setattr(logit_kernels, "chunk_logit_grad_", broken)
    lp, _ = chunked_logprobs(h, w, targets, chunk_size=4)
    torch.testing.assert_close(lp, want_lp)
    assert "the Triton kernel broken failed (RuntimeError: PTX too new for this driver)" in caplog.text
    assert chunked._KERNELS_OK["cpu"] is False  # tried once, then torch from now on
    monkeypatch.setitem(chunked._KERNELS_OK, "cpu", True)  # and the backward falls back as well
    for got, want in zip(torch.autograd.grad(lp.sum(), (h, w)), want_grads):
        torch.testing.assert_close(got, want)


def test_kernels_skip_a_head_with_bias(monkeypatch):
    calls = []
    monkeypatch.setitem(chunked._KERNELS_OK, "cpu", True)
    monkeypatch.setattr(logit_kernels, "chunk_stats", lambda *a: calls.append(a))
    h, w, b = torch.randn(3, 4), torch.randn(10, 4), torch.randn(10)
    chunked_logprobs(h, w, torch.tensor([1, 2, 3]), bias=b, chunk_size=2)
    assert calls == []


def test_grad_kernel_writes_a_separate_16bit_buffer(kernels):
    """float32 logits, bf16 gradient (model.float32_logits): the kernel reads one, writes the other."""
    torch.manual_seed(2)
    n, vocab = 5, logit_kernels.BLOCK + 77
    logits = torch.randn(n, vocab, device=kernels) * 5
    targets = torch.randint(0, vocab, (n,), device=kernels)
    _, lse, entropy = chunk_stats(logits, None, targets, 1.0, True)
    grad_lp, grad_entropy = torch.randn(n, device=kernels), torch.randn(n, device=kernels)
    want, _ = chunk_logit_grad(logits, None, targets, lse, entropy, grad_lp, grad_entropy, 1.0, torch.bfloat16)
    before = logits.clone()
    out = torch.empty(n, vocab, device=kernels, dtype=torch.bfloat16)
    got = logit_kernels.chunk_logit_grad_(logits, targets, lse, entropy, grad_lp, grad_entropy, 1.0, out)
    assert got is out
    torch.testing.assert_close(logits, before)  # the logits are left as they were
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-4)
