"""Which variable-length (packed) attention kernels this torch has, and whether they agree with
per-sequence SDPA, forward and backward, with grouped-query heads (Qwen2.5-0.5B: 14 q, 2 kv).

    python bench/varlen_probe.py
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F


def reference(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    lengths = [700, 33, 1024, 250, 511]
    T, hq, hk, d = sum(lengths), 14, 2, 64
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(T, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hk, hk))
    g = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    ref = reference(q, k, v, lengths)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    print("torch", torch.__version__)
    try:
        from torch.nn.attention.varlen import varlen_attn
        print("varlen_attn", inspect.signature(varlen_attn))
        params = inspect.signature(varlen_attn).parameters
        kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), g)
        print("varlen_attn fwd diff", (out - ref).abs().max().item(),
              "grad diffs", [round((a - b).abs().max().item(), 4) for a, b in zip(grads, ref_grads)])
    except Exception as e:  # report what this torch lacks
        print("varlen_attn failed:", type(e).__name__, str(e)[:300])
    try:
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max(lengths), max(lengths), 0.0, True, False)[0]
        grads = torch.autograd.grad(out, (q, k, v), g)
        print("aten._flash_attention_forward fwd diff", (out - ref).abs().max().item(),
              "grad diffs", [round((a - b).abs().max().item(), 4) for a, b in zip(grads, ref_grads)])
    except Exception as e:
        print("aten._flash_attention_forward failed:", type(e).__name__, str(e)[:300])
    # Speed at a training micro-batch: 16k tokens of 100-1024-token documents.
    lengths = []
    while sum(lengths) < 16384:
        lengths.append(int(torch.randint(100, 1025, (1,))))
    lengths[-1] -= sum(lengths) - 16384
    T = 16384
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(T, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hk, hk))
    g = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    for name, fn in [
        ("flash varlen", lambda: torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max(lengths), max(lengths), 0.0, True, False)[0]),
        ("sdpa per document", lambda: reference(q, k, v, lengths)),
    ]:
        try:
            for _ in range(3):
                torch.autograd.grad(fn(), (q, k, v), g)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                torch.autograd.grad(fn(), (q, k, v), g)
            torch.cuda.synchronize()
            print(f"{name}: fwd+bwd {1e3 * (time.perf_counter() - t) / 10:.2f} ms per layer at 16k tokens")
        except Exception as e:
            print(name, "failed:", type(e).__name__, str(e)[:200])


if __name__ == "__main__":
    main()
