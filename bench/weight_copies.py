"""Decoding a float32 policy: bf16 weight copies vs autocast casts at every step (issue 36, slice 2).

In a GRPO step the engine generates on the trainer's float32 modules under bf16 autocast. Without
copies every decode step casts every matmul weight (read 4 bytes, write 2, read 2); with
``rollout.engine.weight_copies`` (the default) it reads persistent bf16 copies cast once per
weight update. A bf16 model (what bench/rollout_throughput.py measures) is the ceiling.

Correctness first: greedy tokens and sampled logprobs with and without copies must be equal.
Then the in-step shape: 8 prompts x 8 samples x 256 tokens through ``generate()``, each timed
call preceded by what a training step does to the engine (sleep, wake, update_weights).

    python bench/weight_copies.py --shape qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_throughput import _Tok, build_model  # noqa: E402

from posttrain.engine import Engine  # noqa: E402
from posttrain.sampling import SamplingParams  # noqa: E402


def make_engine(model, copies: bool) -> Engine:
    return Engine(model, _Tok(), max_model_len=512, compute_dtype=torch.bfloat16, max_num_seqs=256,
                  weight_copies=copies)


def timed_generate(engine: Engine, prompts, params, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        engine.sleep()  # what a training step does between two rollouts
        engine.update_weights()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        torch.cuda.synchronize()
        rates.append(sum(len(c.token_ids) for g in out for c in g) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 4000, (args.prompts, 90), generator=g).tolist()
    results: dict = {"device": torch.cuda.get_device_name(0), "shape": args.shape}

    model = build_model(args.shape, device, torch.float32)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=64, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=64, ignore_eos=True, seed=7)
    outputs = {}
    for copies in (True, False):
        engine = make_engine(model, copies)
        outputs[copies] = [[c.token_ids for g in engine.generate(prompts, greedy) for c in g],
                           [(c.token_ids, c.logprobs) for g in engine.generate(prompts, sampled) for c in g]]
        engine.sleep()
        del engine
    results["greedy_equal"] = outputs[True][0] == outputs[False][0]
    results["sampled_equal"] = outputs[True][1] == outputs[False][1]
    results["max_abs_logprob_diff"] = max(
        (abs(a - b) for (ta, la), (tb, lb) in zip(outputs[True][1], outputs[False][1]) if ta == tb for a, b in zip(la, lb)),
        default=float("nan"))
    print(json.dumps(results), flush=True)

    params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for name, copies in (("float32 weights, copies (default)", True), ("float32 weights, autocast casts", False)):
        engine = make_engine(model, copies)
        engine.generate(prompts[:2], SamplingParams(n=2, max_tokens=16, ignore_eos=True))  # warm-up, compile
        rates = timed_generate(engine, prompts, params, args.repeats)
        nbytes = engine.weight_copies.nbytes if engine.weight_copies is not None else 0
        rows.append({"variant": name, "tokens_per_s": sorted(rates)[len(rates) // 2], "all": rates, "copy_gib": nbytes / 2**30})
        engine.sleep()
        del engine
        print(json.dumps(rows[-1]), flush=True)
    del model
    torch.cuda.empty_cache()
    model = build_model(args.shape, device, torch.bfloat16)
    engine = make_engine(model, True)
    engine.generate(prompts[:2], SamplingParams(n=2, max_tokens=16, ignore_eos=True))
    rates = timed_generate(engine, prompts, params, args.repeats)
    rows.append({"variant": "bf16 model (ceiling)", "tokens_per_s": sorted(rates)[len(rates) // 2], "all": rates, "copy_gib": 0.0})
    results["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, {args.shape}, {args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens")
    print(f"greedy equal: {results['greedy_equal']}, sampled equal: {results['sampled_equal']}, "
          f"max |dlogprob| {results['max_abs_logprob_diff']:.2e}")
    for r in rows:
        print(f"{r['variant']:<36} {r['tokens_per_s']:>9.0f} tok/s  copies {r['copy_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
