"""Generation throughput: posttrain's engine vs transformers ``generate`` (dynamic and static cache).

Same random-weight model (speed does not depend on the values) and the same prompts for every
backend, in one run. Workloads:
  a  256 prompts x 128 tokens, exactly 256 new tokens each
  b   64 prompts x 128 tokens, exactly 256 new tokens each
  cpu 16 prompts x 128 tokens, exactly 128 new tokens each (the CPU comparison at batch 16)
  c  RL-like: 256 prompts x 8 samples sharing the prompt, each with its own output length drawn
     from a log-normal (median 200, capped at 1024). A static batch runs until its longest member
     is done; only the drawn lengths count as useful tokens.
Prints generated (useful) tokens/s per backend and the engine's share of the memory roofline
(weights + KV read once per decode step at the device's HBM bandwidth).

  python bench/rollout_throughput.py --device cuda --shapes qwen2.5-0.5b,qwen2.5-1.5b --workloads a,b,c
  python bench/rollout_throughput.py --device cpu --shapes tiny --workloads a --scale 0.05   # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.engine import Engine
from posttrain.sampling import SamplingParams

QWEN_COMMON = dict(vocab_size=151936, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-6)
SHAPES = {
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(QWEN_COMMON, hidden_size=896, num_hidden_layers=24,
                                                         num_attention_heads=14, intermediate_size=4864)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(QWEN_COMMON, hidden_size=1536, num_hidden_layers=28,
                                                         num_attention_heads=12, intermediate_size=8960)),
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                         max_position_embeddings=8192, rope_theta=100000.0,
                                                         tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "tiny": (Qwen2Config, Qwen2ForCausalLM, dict(QWEN_COMMON, vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=128)),
}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
EOS = 2


class _Tok:
    """What the engine needs from a tokenizer when no text is produced (no stop strings)."""

    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return ""


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config_cls, model_cls, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    config = config_cls(**kwargs, eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
    with torch.device(device):
        model = model_cls(config).to(dtype)
    model.generation_config.max_length = None
    return model.eval()


def workload(name: str, vocab: int, scale: float, seed: int = 0):
    """Returns (prompts, per-sequence output lengths, samples per prompt)."""
    g = torch.Generator().manual_seed(seed)
    num_prompts = {"a": 256, "b": 64, "c": 256, "cpu": 16}[name]
    num_prompts = max(1, round(num_prompts * scale))
    prompts = torch.randint(3, vocab, (num_prompts, 128), generator=g).tolist()
    if name == "cpu":
        return prompts, [[128] for _ in prompts], 1
    if name in ("a", "b"):
        return prompts, [[max(1, round(256 * min(scale * 4, 1)))] for _ in prompts], 1
    lengths = torch.exp(torch.randn(num_prompts, 8, generator=g) * 0.8 + math.log(200)).round().clamp(1, 1024)
    if scale < 1:
        lengths = (lengths * scale).round().clamp(1, 1024)
    return prompts, lengths.long().tolist(), 8


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(model, prompts, lengths, device, dtype, max_num_seqs) -> dict:
    max_len = 128 + max(max(l) for l in lengths)
    start = time.perf_counter()
    engine = Engine(model, _Tok(), max_model_len=max_len, compute_dtype=dtype, max_num_seqs=max_num_seqs,
                    kv_cache_memory_fraction=0.85, cpu_kv_cache_gb=4.0)
    setup_s = time.perf_counter() - start

    def go():
        for prompt, lens in zip(prompts, lengths):
            for n in lens:  # one request per sample: each has its own length; the prompt's blocks are shared
                engine.add_request(prompt, SamplingParams(n=1, temperature=1.0, max_tokens=n, ignore_eos=True, logprobs=True))
        _sync(device)
        t0 = time.perf_counter()
        steps = 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        _sync(device)
        return time.perf_counter() - t0, steps

    go_short = [[min(8, n) for n in l] for l in lengths[:8]]
    for prompt, lens in zip(prompts[:8], go_short):  # warm-up (allocator, Triton autotune/compile)
        for n in lens:
            engine.add_request(prompt, SamplingParams(n=1, max_tokens=n, ignore_eos=True))
    engine.run_until_done()
    engine.update_weights()  # drop the warm-up's cached prefixes
    seconds, steps = go()
    stats = engine.stats()
    engine.sleep()
    return {"seconds": seconds, "tokens": sum(sum(l) for l in lengths), "setup_s": setup_s, "steps": steps,
            "prefix_hit_tokens": stats.get("engine/prefix_cache_hit_tokens", 0.0), "preemptions": stats.get("engine/preemptions", 0.0)}


def run_hf(model, prompts, lengths, device, static: bool, batch_rows: int, max_batches: int) -> dict:
    """transformers generate over batches of ``batch_rows`` sequences; every row of a batch runs for
    the batch's longest length (that is what a static batch does), only the drawn lengths count."""
    rows = [(p, n) for p, lens in zip(prompts, lengths) for n in lens]
    batches = [rows[i : i + batch_rows] for i in range(0, len(rows), batch_rows)]
    # Static cache: one shape for all batches (longest length overall) so compilation happens once.
    cap = max(n for _, n in rows)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"

    def gen(batch):
        ids = torch.tensor([p for p, _ in batch], device=device)
        new = cap if static else max(n for _, n in batch)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **kwargs)
        return new

    t0 = time.perf_counter()
    gen(batches[0])  # warm-up; for the static cache this compiles
    _sync(device)
    warmup_s = time.perf_counter() - t0
    timed = batches[1 : 1 + max_batches] if len(batches) > 1 else batches[:1]
    useful = 0
    _sync(device)
    t0 = time.perf_counter()
    for batch in timed:
        gen(batch)
        useful += sum(n for _, n in batch)
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "tokens": useful, "setup_s": warmup_s, "batches": f"{len(timed)}/{len(batches)}"}


def roofline_tokens_per_s(model, lengths, device) -> float | None:
    """Decode tokens/s if each step only read the weights and the batch's KV cache once."""
    # Static picture of workload a/b: all sequences decode together at the mean context length.
    flat = [n for l in lengths for n in l]
    return decode_roofline_tokens_per_s(model, len(flat), 128 + sum(flat) / len(flat) / 2, device)


def decode_roofline_tokens_per_s(model, batch: int, mean_context: float, device) -> float | None:
    """Decode tokens/s of ``batch`` sequences at ``mean_context`` tokens if each step read every
    weight and the batch's KV cache once from HBM; None off a GPU of known bandwidth."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    bandwidth = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    if bandwidth is None:
        return None
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen3: its own
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    return batch / (step_bytes / bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--workloads", default="a,b,c")
    parser.add_argument("--backends", default="engine,hf_static,hf_dynamic")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink prompts and lengths (smoke tests)")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--dynamic-workloads", default="a,b,c",
                        help="workloads on which hf_dynamic runs (it is the slowest baseline)")
    parser.add_argument("--hf-batch-rows", type=int, default=256, help="rows per generate call in workload c")
    parser.add_argument("--hf-max-batches", type=int, default=1,
                        help="workload c: time this many generate batches after the warm-up one (rate is per batch)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    for shape in args.shapes.split(","):
        model = build_model(shape, device, dtype)
        vocab = model.config.vocab_size
        for w in args.workloads.split(","):
            prompts, lengths, _ = workload(w, vocab, args.scale)
            for backend in args.backends.split(","):
                if backend == "hf_dynamic" and w not in args.dynamic_workloads.split(","):
                    continue
                try:
                    if backend == "engine":
                        r = run_engine(model, prompts, lengths, device, dtype, args.max_num_seqs)
                    else:
                        rows = args.hf_batch_rows if w == "c" else len(prompts)
                        r = run_hf(model, prompts, lengths, device, backend == "hf_static", rows, args.hf_max_batches if w == "c" else 1)
                except Exception as exc:  # keep going: one failing backend must not lose the others' numbers
                    print(f"{shape} {w} {backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                r.update(shape=shape, workload=w, backend=backend, tok_s=r["tokens"] / r["seconds"])
                if backend == "engine" and w in ("a", "b"):
                    roof = roofline_tokens_per_s(model, lengths, device)
                    r["roofline_share"] = r["tok_s"] / roof if roof else None
                results.append(r)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| shape | workload | backend | tokens/s | vs hf_static | roofline share | seconds | setup s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        base = next((b["tok_s"] for b in results if b["shape"] == r["shape"] and b["workload"] == r["workload"]
                     and b["backend"] == "hf_static"), None)
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        roof = f"{r['roofline_share']:.1%}" if r.get("roofline_share") else "-"
        print(f"| {r['shape']} | {r['workload']} | {r['backend']} | {r['tok_s']:,.0f} | {ratio} | {roof} | "
              f"{r['seconds']:.2f} | {r['setup_s']:.1f} |")


if __name__ == "__main__":
    main()
