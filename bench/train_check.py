"""GPU correctness of the training fast paths against plain references, before any timing:

- chunked logprobs (bf16 matmuls, float32 accumulation of the head gradient) vs the plain
  float32 log-softmax of bf16 logits: values and gradients w.r.t. hidden states and the head;
- the one-pass Triton logit kernels vs the torch functions they replace, at a 152k vocabulary,
  then their time per 4096-token chunk against the compiled torch functions, for a few block sizes;
- a packed sdpa_varlen micro-batch vs one padded sdpa row per completion: logprobs and the
  gradient of every parameter, for the Qwen2.5-0.5B shape (random weights), bf16 autocast.

    python bench/train_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, build_model, make_steps  # noqa: E402

from posttrain.models import chunked_logprobs as chunked  # noqa: E402
from posttrain.models import logit_kernels  # noqa: E402
from posttrain.models.chunked_logprobs import chunked_logprobs  # noqa: E402
from posttrain.models.logprobs import response_logprobs  # noqa: E402
from posttrain.trainer.samples import collate  # noqa: E402


def check_chunked(device: torch.device, n: int = 3000, hidden: int = 896, vocab: int = 151936) -> None:
    torch.manual_seed(0)
    h = (torch.randn(n, hidden, device=device) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    g = torch.randn(n, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lp, _ = chunked_logprobs(h, w, targets, chunk_size=1024)
    grads = torch.autograd.grad((lp * g).sum(), (h, w))
    logits = (h @ w.to(torch.bfloat16).t()).float()
    ref = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    ref_grads = torch.autograd.grad((ref * g).sum(), (h, w))
    print(f"chunked logprobs: max |diff| {(lp - ref).abs().max().item():.2e}; grad h rel "
          f"{((grads[0] - ref_grads[0]).float().norm() / ref_grads[0].float().norm()).item():.2e}; grad W rel "
          f"{((grads[1] - ref_grads[1]).norm() / ref_grads[1].norm()).item():.2e}")


def _ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def check_kernels(device: torch.device, vocab: int = 151936) -> None:
    torch.manual_seed(0)
    n = 512
    logits = (torch.randn(n, vocab, device=device) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device=device)
    g, g_entropy = torch.randn(n, device=device), torch.randn(n, device=device)
    for temperature in (1.0, 0.7):
        want = chunked.chunk_stats(logits, None, targets, temperature, True)
        got = (torch.empty(n, device=device), torch.empty(n, device=device), torch.empty(n, device=device))
        logit_kernels.chunk_stats(logits, targets, temperature, True, got)
        want_grad, _ = chunked.chunk_logit_grad(logits, None, targets, want[1], want[2], g, g_entropy, temperature,
                                                torch.bfloat16)
        got_grad = logit_kernels.chunk_logit_grad_(logits.clone(), targets, want[1], want[2], g, g_entropy, temperature)
        diffs = [(a - b).abs().max().item() for a, b in zip(got, want)]
        grad_diff = ((got_grad.float() - want_grad.float()).norm() / want_grad.float().norm()).item()
        print(f"triton kernels T={temperature}: logprob/lse/entropy max |diff| "
              f"{diffs[0]:.1e}/{diffs[1]:.1e}/{diffs[2]:.1e}; logit grad rel {grad_diff:.1e}")

    n = 4096
    logits = (torch.randn(n, vocab, device=device) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device=device)
    g, g_entropy = torch.randn(n, device=device), torch.randn(n, device=device)
    lse, entropy = torch.empty(n, device=device), torch.empty(n, device=device)
    stats_c = torch.compile(chunked.chunk_stats, dynamic=None)
    grad_c = torch.compile(chunked.chunk_logit_grad, dynamic=None)
    rows = [("torch.compile", _ms(lambda: stats_c(logits, None, targets, 1.0, True)),
             _ms(lambda: grad_c(logits, None, targets, lse, entropy, g, g_entropy, 1.0, torch.bfloat16)))]
    buffer = logits.clone()
    for block, warps in [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 32)]:
        logit_kernels.BLOCK, logit_kernels.NUM_WARPS = block, warps
        rows.append((f"triton block {block} warps {warps}",
                     _ms(lambda: logit_kernels.chunk_stats(logits, targets, 1.0, True, (g.clone(), lse, entropy))),
                     _ms(lambda: logit_kernels.chunk_logit_grad_(buffer, targets, lse, entropy, g, g_entropy, 1.0))))
    print(f"per chunk of {n} x {vocab} bf16 logits (ms):")
    print(f"{'':32s} {'stats':>8s} {'grad':>8s}")
    for name, stats_ms, grad_ms in rows:
        print(f"{name:32s} {stats_ms:8.3f} {grad_ms:8.3f}")


def check_packed(device: torch.device, shape: str = "0.5b") -> None:
    samples = make_steps(1, 8192, 100, 1024, SHAPES[shape]["vocab_size"], seed=3)[0]
    grads = {}
    for name, attn, packed in [("padded sdpa", "sdpa", False), ("packed sdpa_varlen", "sdpa_varlen", True)]:
        model = build_model(shape, device, attn)
        batch = collate(samples, 0, device, packed=packed)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            lp, _ = response_logprobs(model, batch.tokens, chunk_size=1024)
        mask = batch.tokens.response_mask
        (lp * mask).sum().div(mask.sum()).backward()
        grads[name] = (lp.detach() * mask, {n: p.grad.float() for n, p in model.named_parameters()})
        del model
    (lp_a, g_a), (lp_b, g_b) = grads.values()
    worst = max(((g_a[n] - g_b[n]).norm() / g_a[n].norm().clamp(min=1e-12)).item() for n in g_a)
    print(f"packed varlen vs padded sdpa ({len(samples)} completions): logprobs max |diff| "
          f"{(lp_a - lp_b).abs().max().item():.2e}, mean {(lp_a - lp_b).abs().sum().item() / (lp_a != 0).sum().item():.2e}; "
          f"worst parameter-gradient relative difference {worst:.2e}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--smoke"]:  # CPU, tiny sizes: the code runs (sdpa_varlen is sdpa on CPU)
        check_chunked(torch.device("cpu"), n=100, hidden=64, vocab=1000)
        check_packed(torch.device("cpu"), "tiny")
    else:
        check_chunked(torch.device("cuda"))
        check_kernels(torch.device("cuda"))
        check_packed(torch.device("cuda"))
