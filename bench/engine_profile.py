"""Where a decode step's time goes: host-side phases (synchronised timers) and the top GPU kernels.

  python bench/engine_profile.py --shape qwen2.5-0.5b --batch 64
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
from posttrain.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(args.shape, device, torch.bfloat16)
    engine = Engine(model, _Tok(), max_model_len=512, compute_dtype=torch.bfloat16, max_num_seqs=512)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, 128)).tolist()
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=300, ignore_eos=True))
    for _ in range(10):
        engine.step()  # prefill + warm decode
    sched, runner = engine.scheduler, engine.runner
    phases = {"schedule": 0.0, "model (replay)": 0.0, "sampler": 0.0, "postprocess": 0.0}
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        seqs, is_prefill = sched.schedule()
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = runner._run_decode(seqs)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            out = runner.sampler(logits, [s.sampling for s in seqs])
        t3 = time.perf_counter()
        engine._postprocess(seqs, out)
        t4 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k] += v
    print(f"graphs: {sorted(runner.graphs)[:3]}...{len(runner.graphs)} captured; triton={runner.use_triton}")
    for k, v in phases.items():
        print(f"{k:>16}: {v / args.steps * 1e3:.3f} ms/step")
    graphs = runner.graphs
    runner.graphs = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    print(f"eager decode step (no graphs): {(time.perf_counter() - t0) / 5 * 1e3:.3f} ms")
    runner.graphs = graphs
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
