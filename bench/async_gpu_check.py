"""Asynchronous GRPO on a GPU, checked: the replicas generate on the GPU (their own CUDA stream),
every step's weights reach them (at the end their parameters equal the trainer's), K=0 gives the
synchronous run's metrics step by step (same seed), and K>=1 stays within its staleness bound.

Runs ``sync``, ``async:0`` and ``async:1`` (``--modes``) through bench/async_grpo.py's ``run`` on a
random-init model of a real shape (bench/random_model.py) on the embedded arithmetic task, a
smaller batch than the TRL workload so that it is quick.

    python bench/async_gpu_check.py --steps 3 --json /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import async_grpo
import random_model

from posttrain.cluster.replicas import unwrap_policy
from posttrain.trainer import grpo

LEARNING_KEYS = ("reward/mean", "loss/policy", "kl", "entropy", "grad_norm", "response/length_mean")
NOT_COMPARED = ("time/", "timestamp", "sync/", "perf/", "throughput", "off_policy/staleness", "off_policy/admitted",
                "rollout/replica", "memory/")
CAPTURED: dict = {}


def capture_pool(original):
    def build(cfg, model, tokenizer, compute_dtype, start_version):
        pool = original(cfg, model, tokenizer, compute_dtype, start_version=start_version)
        CAPTURED.update(pool=pool, model=model)
        return pool
    return build


def checksum(params) -> float:
    return float(sum(p.detach().double().sum().item() for p in params))


def replica_check(steps: int) -> dict:
    """The replicas against the trainer's policy after the run (the pool is closed, the copies remain)."""
    pool, model = CAPTURED["pool"], unwrap_policy(CAPTURED["model"])
    trainer = dict(model.named_parameters())
    out = {"trainer_checksum": checksum(trainer.values()), "replicas": []}
    if not all(hasattr(r, "model") for r in getattr(pool, "replicas", [None])):
        # process / ray replicas hold their weights in other processes: only what the pool reports
        out["pool"] = type(pool).__name__
        out["versions"] = list(getattr(pool, "versions", []))
        out["restarts"] = list(getattr(pool, "restarts", []))
        return out
    for replica in pool.replicas:
        own = dict(replica.model.named_parameters())
        diff = max((own[n].detach().float() - p.detach().float()).abs().max().item() for n, p in trainer.items())
        out["replicas"].append({
            "id": replica.replica_id, "device": str(replica.device), "own_stream": replica._stream is not None,
            "param_device": str(next(replica.model.parameters()).device),
            "param_dtype": str(next(replica.model.parameters()).dtype), "version": replica.version,
            "expected_version": steps, "requests_done": replica.requests_done, "checksum": checksum(own.values()),
            "max_abs_diff_vs_trainer": diff,
        })
    return out


def compare(a: dict, b: dict) -> dict:
    """Per key: the largest relative difference over the steps both runs logged."""
    worst: dict[str, float] = {}
    for step in sorted(set(a) & set(b)):
        for key in set(a[step]) & set(b[step]):
            if any(key.startswith(p) for p in NOT_COMPARED) or not isinstance(a[step][key], (int, float)):
                continue
            x, y = float(a[step][key]), float(b[step][key])
            if math.isnan(x) and math.isnan(y):
                continue
            rel = abs(x - y) / max(abs(x), abs(y), 1e-12)
            worst[key] = max(worst.get(key, 0.0), rel)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="sync,async:0,async:1")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out_root = Path(tempfile.mkdtemp(prefix="async-gpu-check-"))
    model_path = str(out_root / "model")
    random_model.main(["--shape", args.shape, "--out", model_path])
    grpo.build_replica_pool = capture_pool(grpo.build_replica_pool)
    extra = ["rollout.batch_size=32", "rollout.group_size=8", "rollout.max_new_tokens=64", "trainer.mini_batch_size=32",
             "data.arithmetic.num_train=500", *args.override]
    results, metrics = {}, {}
    for mode in args.modes.split(","):
        CAPTURED.clear()
        r = async_grpo.run(mode, model_path, args.steps, "default", extra, out_root)
        lines = [json.loads(line) for line in (out_root / mode.replace(":", "") / "metrics.jsonl").read_text().splitlines()]
        metrics[mode] = {m["step"]: m for m in lines if "reward/mean" in m}
        row = {"s_per_step": r["s_per_step"], "rewards": r["rewards"],
               "per_step": {s: {k: m.get(k) for k in (*LEARNING_KEYS, "off_policy/staleness_max", "off_policy/admitted_version",
                                                     "sync/bytes", "sync/seconds", "rollout/replica_version_min")}
                            for s, m in metrics[mode].items()}}
        if mode.startswith("async"):
            row["replica_check"] = replica_check(args.steps)
            k = int(mode.split(":")[1])
            row["staleness_max"] = max(m.get("off_policy/staleness_max", 0.0) for m in metrics[mode].values())
            row["staleness_within_bound"] = row["staleness_max"] <= k
            row["weights_pushed_every_step"] = all(m.get("sync/bytes", 0) > 0 for m in metrics[mode].values())
        if mode != "sync" and "sync" in metrics:
            worst = compare(metrics["sync"], metrics[mode])
            row["vs_sync_worst_rel_diff"] = dict(sorted(worst.items(), key=lambda kv: -kv[1]))
            row["vs_sync_learning_keys_equal"] = all(worst.get(k, 0.0) <= 1e-5 for k in LEARNING_KEYS)
        results[mode] = row
        print(json.dumps({mode: row}, indent=1, default=str), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


if __name__ == "__main__":
    main()
