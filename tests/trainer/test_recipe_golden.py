"""The four recipes produce the metrics they produced before the shared set-up (issue 28, slice 4):
a fixed-seed tiny GRPO, PPO, SFT and DPO run, each 2 steps with validation, compared metric by
metric (every non-timing value) with the values recorded in tests/trainer/golden/*.json.

A restructuring must leave these unchanged. A change that is meant to change training or its
metrics records them again, and says why in its commit:
    POSTTRAIN_RECORD_GOLDEN=1 python -m pytest tests/trainer/test_recipe_golden.py
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("POSTTRAIN_RECORD_GOLDEN") == "1"
# Wall-clock, throughput and memory readings differ run to run; everything else must not.
VOLATILE_PREFIXES = ("time/", "perf/", "memory/", "sync/seconds", "timestamp", "mfu", "gpu/")
# Float sums over the same values in the same order are exact on one machine; a CPU with other
# vector units may round a reduction differently in the last bits, which a few steps amplify.
RTOL, ATOL = 1e-4, 1e-6

COMMON = ["logging.progress_bar=false", "checkpoint.every=0", "seed=7"]
RL = ["rollout.batch_size=8", "rollout.max_new_tokens=8", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
      "trainer.lr=1e-3", "algorithm.kl_coef=0.01", "data.arithmetic.difficulty=2", "data.arithmetic.num_train=32",
      "data.arithmetic.num_validation=4", "validation.at_start=true", "validation.at_end=true",
      "env.cls=toy_envs.DigitFractionEnv", "env.num_workers=0"]


def _write_chats(path: Path) -> str:
    rows = [{"prompt": f"say {i}", "completion": f"{i}{i}"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_pairs(path: Path) -> str:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(16):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}? ok?", "chosen": "yes", "rejected": "no"}) + "\n")
    return str(path)


def _args(recipe: str, model_dir: str, out: Path, tmp_path: Path) -> list[str]:
    base = [recipe, f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.max_steps=2", *COMMON]
    if recipe == "grpo":
        return [*base, *RL, "rollout.group_size=4"]
    if recipe == "ppo":
        return [*base, *RL, "critic.lr=1e-3"]
    if recipe == "sft":
        return [*base, f"data.train_path={_write_chats(tmp_path / 'chats.jsonl')}", "data.validation_size=4",
                "data.max_seq_len=48", "trainer.batch_tokens=160", "trainer.micro_batch_tokens=96", "trainer.lr=1e-3",
                "trainer.warmup_steps=1", "trainer.eval_every=1"]
    return [*base, f"data.train_path={_write_pairs(tmp_path / 'pairs.jsonl')}", "trainer.batch_size=4",
            "trainer.micro_batch_size=2", "trainer.lr=1e-3", "trainer.warmup_steps=1", "trainer.eval_every=1",
            "data.validation_size=4"]


def _stable_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the volatile readings, one dict per line."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE_PREFIXES)} for m in lines]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", ["grpo", "ppo", "sft", "dpo"])
def test_recipe_metrics_match_the_recorded_run(recipe, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # toy_envs for the reward env
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    assert main(_args(recipe, model_dir, out, tmp_path)) == 0
    got = _stable_metrics(out)
    path = GOLDEN / f"{recipe}.json"
    if RECORD:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {path}")
    want = json.loads(path.read_text())
    assert len(got) == len(want), f"{len(got)} metrics lines, recorded {len(want)}"
    for line, (g, w) in enumerate(zip(got, want), 1):
        # A new metric is not a regression; a missing or changed one is.
        missing = sorted(set(w) - set(g))
        assert not missing, f"line {line}: metrics no longer logged: {missing}"
        changed = {k: (g[k], w[k]) for k in w if not _same(g[k], w[k])}
        assert not changed, f"line {line} (step {w.get('step')}): (now, recorded) {changed}"
