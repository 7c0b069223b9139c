"""Correctness of the engine on the device, before any timing.

1. The Triton paged-decode kernel against the gathered SDPA reference (bf16 and fp32).
2. fp32: engine greedy tokens identical to transformers greedy (Qwen2 and Llama shapes, random weights).
3. bf16: engine logprobs against the trainer's forward pass (max |diff|, target 2e-2) and the
   share of greedy tokens equal to transformers' before the first divergence.
4. sleep()/wake(): device memory released and regained; CUDA graph capture time.

  python bench/engine_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rollout_throughput import _Tok, build_model  # noqa: E402

from posttrain.engine import Engine
from posttrain.engine.attention import AttentionMetadata, attend_gathered, paged_decode_attention, triton_available
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.rollout.base import SamplingParams


def check_kernel(device, dtype) -> float:
    torch.manual_seed(0)
    num_seqs, heads, kv_heads, head_dim, block = 37, 14, 2, 64, 16
    num_blocks = 400
    k_cache = torch.randn(num_blocks * block, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.randint(1, 700, (num_seqs,), device=device, dtype=torch.int32)
    width = (700 + block - 1) // block
    tables = torch.stack([torch.randperm(num_blocks, device=device)[:width] for _ in range(num_seqs)]).to(torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, device=device, dtype=dtype)
    meta = AttentionMetadata(is_prefill=False, slot_mapping=torch.zeros(1, device=device, dtype=torch.long),
                             context_lens=lens.long(), block_tables=tables.long(), max_context_len=int(lens.max()))
    ref = attend_gathered(q.float(), k_cache.float(), v_cache.float(), meta, head_dim**-0.5, block)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, block)
    return (out.float() - ref).abs().max().item()


def greedy_ref(model, prompt, n):
    out = model.generate(torch.tensor([prompt], device=model.device), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    if triton_available(device):
        for dtype in (torch.bfloat16, torch.float32):
            rows.append((f"triton decode kernel vs SDPA reference, {dtype}", f"max|diff| {check_kernel(device, dtype):.2e}"))

    g = torch.Generator().manual_seed(1)
    for shape in ("tiny", "smollm2-135m"):
        model = build_model(shape, device, torch.float32)
        prompts = torch.randint(3, model.config.vocab_size, (6, 40), generator=g).tolist()
        engine = Engine(model, _Tok(), max_model_len=128, compute_dtype=torch.float32, max_num_seqs=16)
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
        same = sum(c.token_ids == greedy_ref(model, p, 48) for p, [c] in zip(prompts, out))
        rows.append((f"fp32 greedy == transformers, {shape}", f"{same}/{len(prompts)} prompts identical (48 tokens)"))
        del engine, model

    for shape in ("qwen2.5-0.5b", "smollm2-135m"):
        model = build_model(shape, device, torch.bfloat16)
        prompts = torch.randint(3, model.config.vocab_size, (16, 64), generator=g).tolist()
        t0 = time.perf_counter()
        engine = Engine(model, _Tok(), max_model_len=256, compute_dtype=torch.bfloat16, max_num_seqs=64)
        setup = time.perf_counter() - t0
        out = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=64, ignore_eos=True))
        comps = [c for group in out for c in group]
        batch = make_token_batch([c.prompt_token_ids for c in comps], [c.token_ids for c in comps], 0, device)
        with torch.no_grad():
            ref, _ = response_logprobs(model, batch, temperature=1.0)
        diffs = torch.cat([(torch.tensor(c.logprobs, device=device) - ref[i, : len(c.token_ids)].float()).abs() for i, c in enumerate(comps)])
        rows.append((f"bf16 engine vs trainer logprobs, {shape}", f"mean {diffs.mean():.2e}, max {diffs.max():.2e}"))
        greedy = engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
        agree = []
        for p, [c] in zip(prompts[:8], greedy):
            ref_tokens = greedy_ref(model, p, 32)
            k = next((i for i, (a, b) in enumerate(zip(c.token_ids, ref_tokens)) if a != b), 32)
            agree.append(k)
        rows.append((f"bf16 greedy tokens before first divergence, {shape}", f"{agree}"))
        if device.type == "cuda":
            torch.cuda.synchronize()
            awake = torch.cuda.memory_allocated()
            ptr = engine.runner.kv_cache.data_ptr()
            engine.sleep()
            asleep = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            engine.wake()
            wake_s = time.perf_counter() - t0
            rows.append((f"sleep/wake, {shape}", f"allocated {awake / 2**30:.2f} -> {asleep / 2**30:.2f} GiB asleep; "
                         f"wake {wake_s:.2f} s (cache at the same address, graphs kept: {engine.runner.kv_cache.data_ptr() == ptr}); first start {setup:.1f} s"))
        del engine, model
        torch.cuda.empty_cache() if device.type == "cuda" else None

    print("\n| check | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")


if __name__ == "__main__":
    main()
