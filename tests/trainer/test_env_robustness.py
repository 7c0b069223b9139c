"""A run whose reward environment hangs, crashes or raises on some samples still completes every step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from trainer.test_grpo_e2e import read_metrics, tiny_run_args

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"


def test_run_with_hanging_and_crashing_rewards_completes_all_steps(tmp_path):
    rng = random.Random(0)
    rows = [
        {"prompt": f"Say something #{i}", "mode": rng.choice(["ok", "ok", "ok", "sleep", "crash", "raise"]), "value": 1.0}
        for i in range(24)
    ]
    data = tmp_path / "faulty.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    args = tiny_run_args(
        save_tiny_model(tmp_path / "model"), out, 3,
        "data.task=prompts", f"data.train_path={data}", "data.validation_size=4", "data.shuffle=false",
        "env.cls=envs.faulty_envs.ScriptedEnv", "env.num_workers=2", "env.timeout_s=1",
        "validation.at_start=false", "validation.at_end=false", "checkpoint.every=0",
    )
    assert main(args) == 0
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    errors = sum(m["reward/errors"] for m in metrics.values())
    assert errors > 0  # some samples hung or crashed and were scored 0 instead of stopping the run
    assert (out / "checkpoints" / "step_000003").is_dir()


@pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="shared GSM8K data not present")
def test_gsm8k_preset_trains_on_the_shared_files(tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(
        save_tiny_model(tmp_path / "model"), out, 1,
        "--config", "gsm8k", "data.arithmetic.num_train=64",
        f"data.train_path={GSM8K / 'train.jsonl'}", f"data.validation_path={GSM8K / 'test.jsonl'}",
        "env.cls=math", "rollout.max_new_tokens=8", "validation.max_prompts=2", "trainer.warmup_steps=0",
    )
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/accuracy" in m for m in lines) and any("reward/accuracy" in m for m in lines)


def test_math_preset_scores_latex_answers(tmp_path):
    rows = [{"problem": f"Compute {i}/{i + 1} in lowest terms.", "answer": f"\\frac{{{i}}}{{{i + 1}}}"} for i in range(1, 13)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = tiny_run_args(
        save_tiny_model(tmp_path / "model"), out, 1, "--config", "math", f"data.train_path={data}",
        "data.validation_size=4", "rollout.max_new_tokens=8", "validation.max_prompts=2", "trainer.warmup_steps=0",
        "env.cls=math",
    )
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/accuracy" in m for m in lines)
