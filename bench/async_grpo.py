"""Synchronous vs asynchronous GRPO on one device: steps/hour, reward curve, held-out accuracy.

Each mode trains the same config from the same seed; ``async:K`` is ``rollout.mode=async
rollout.max_staleness=K`` with one engine replica in the trainer's process (cluster.backend=local:
its own copy of the policy, generating in a background thread while the trainer trains, on the
same GPU). Throughput is measured between the metrics lines of step 3 and the last step, so
model loading, compilation and CUDA-graph capture are left out equally for every mode.

    python bench/async_grpo.py --model smol.gguf --steps 50                 # the default task
    python bench/async_grpo.py --workload trl --steps 8                      # Qwen2.5-0.5B shape, 64 x 256
    python bench/async_grpo.py --modes sync,async:1 --steps 6 --override rollout.batch_size=32

Workloads: ``default``: the embedded arithmetic task and the given model (held-out accuracy on
300 unseen two-digit problems after training, bench/heldout_eval.py); ``trl``: a random
Qwen2.5-0.5B-shaped model (bench/random_model.py), 64 completions x 256 tokens per step, KL 0.04,
the shape of TRL's GRPO benchmark (rewards of a random model are ~0: speed only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posttrain.config.loader import load_config  # noqa: E402
from posttrain.config.schema import GRPOConfig  # noqa: E402
from posttrain.trainer.grpo import train  # noqa: E402

QUIET = ["logging.progress_bar=false", "logging.console_every=0", "validation.every=0", "validation.at_start=false",
         "validation.at_end=false", "checkpoint.every=0", "logging.samples_every=0"]
TRL_SHAPED = ["rollout.batch_size=64", "rollout.group_size=8", "rollout.max_new_tokens=256", "trainer.mini_batch_size=64",
              "algorithm.kl_coef=0.04", "data.arithmetic.num_train=2000"]
CURVES = ("reward/mean", "loss/policy", "kl", "entropy", "response/length_mean", "off_policy/mismatch_kl")


def mode_overrides(mode: str) -> list[str]:
    if mode == "sync":
        return ["rollout.mode=sync"]
    if mode.startswith("async:"):
        return ["rollout.mode=async", f"rollout.max_staleness={int(mode.split(':')[1])}"]
    raise SystemExit(f"unknown mode {mode!r}: use sync or async:K")


def run(mode: str, model_path: str, steps: int, workload: str, extra: list[str], out_root: Path) -> dict:
    out = out_root / mode.replace(":", "")
    overrides = [f"model.path={model_path}", f"trainer.max_steps={steps}", f"trainer.output_dir={out}", *QUIET,
                 *(TRL_SHAPED if workload == "trl" else []), *mode_overrides(mode), *extra]
    cfg = load_config(GRPOConfig, None, overrides)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = {m["step"]: m for m in lines if "reward/mean" in m}
    first, last = min(3, steps), steps
    span = metrics[last]["timestamp"] - metrics[first]["timestamp"]
    rewards = [metrics[s]["reward/mean"] for s in sorted(metrics)]
    mean = lambda key: sum(m.get(key, 0.0) for m in metrics.values()) / len(metrics)  # noqa: E731
    return {
        "mode": mode, "wall_s": wall, "steps_per_hour": 3600 * (last - first) / span if span > 0 else float("nan"),
        "s_per_step": span / max(last - first, 1), "generate_s": mean("time/generate"), "train_s": mean("time/train"),
        "wait_s": mean("time/wait_rollouts"), "sync_s": mean("sync/seconds"), "staleness": mean("off_policy/staleness_mean"),
        "reward_first5": sum(rewards[:5]) / len(rewards[:5]), "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]),
        "rewards": rewards, "curves": {k: [metrics[s].get(k) for s in sorted(metrics)] for k in CURVES},
        "checkpoint": str(out / "checkpoints" / f"step_{steps:06d}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="default", choices=["default", "trl"])
    parser.add_argument("--model", default="embedded", help="model path for --workload default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--modes", default="sync,async:1,async:2")
    parser.add_argument("--heldout", type=int, default=300, help="held-out problems scored after training (0: skip)")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every mode")
    parser.add_argument("--out", default="", help="run folders (default: a temp folder)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    out_root = Path(args.out or tempfile.mkdtemp(prefix="async-grpo-"))
    model_path = args.model
    if args.workload == "trl":
        import random_model

        model_path = str(out_root / "qwen05-random")
        random_model.main(["--shape", "qwen2.5-0.5b", "--out", model_path])
    problems = None
    if args.workload == "default" and args.heldout:
        from heldout_eval import evaluate, heldout_problems

        problems = heldout_problems(args.heldout, 1234)
    print(f"\n{args.workload} workload, {args.steps} steps ({', '.join(args.override) or 'defaults'})", flush=True)
    results = []
    for mode in args.modes.split(","):  # each row as soon as its run ends: a cut-off bench keeps what it measured
        r = run(mode, model_path, args.steps, args.workload, args.override, out_root)
        if problems is not None:
            r["heldout_accuracy"] = evaluate(r["checkpoint"], problems, "auto", 128).get("val/accuracy", float("nan"))
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"{mode}: {r['steps_per_hour']:.0f} steps/h, {r['s_per_step']:.2f} s/step", flush=True)
    base = results[0]["steps_per_hour"]
    print(f"\n{args.workload} workload, {args.steps} steps ({', '.join(args.override) or 'defaults'})")
    print(f"{'mode':<9} {'steps/h':>8} {'x':>5} {'s/step':>7} {'gen s':>6} {'train s':>7} {'wait s':>6} {'sync s':>6} "
          f"{'stale':>5} {'reward 1-5':>10} {'last 5':>7} {'held-out':>8}")
    for r in results:
        print(f"{r['mode']:<9} {r['steps_per_hour']:>8.0f} {r['steps_per_hour'] / base:>5.2f} {r['s_per_step']:>7.2f} "
              f"{r['generate_s']:>6.2f} {r['train_s']:>7.2f} {r['wait_s']:>6.2f} {r['sync_s']:>6.3f} {r['staleness']:>5.2f} "
              f"{r['reward_first5']:>10.3f} {r['reward_last5']:>7.3f} {r.get('heldout_accuracy', float('nan')):>8.3f}")


if __name__ == "__main__":
    main()
