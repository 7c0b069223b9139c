"""End to end: one GRPO step on a mix of two tasks (math + a toy environment), reported per task."""

from __future__ import annotations

import json

from helpers import save_tiny_model
from posttrain.cli import main
from test_grpo_e2e import read_metrics, tiny_run_args


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixed_tasks_one_step_reports_per_task_rewards(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    math = write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"What is {i} + 2?", "answer": i + 2} for i in range(12)])
    digits = write_jsonl(tmp_path / "digits.jsonl", [{"prompt": f"Write digits {i}"} for i in range(12)])
    out = tmp_path / "run"
    args = tiny_run_args(
        model_dir, out, 1, "data.task=prompts", "data.validation_size=2", "validation.at_start=false",
        "checkpoint.every=0", "rollout.batch_size=32", "rollout.group_size=2",
        "trainer.mini_batch_size=16", "trainer.micro_batch_size=8",  # 16 prompts: both tasks are drawn
        f"data.mix=[{{path: {math}, task: math, weight: 1, answer_column: answer}}, {{path: {digits}, task: digits, weight: 1}}]",
        "env.tasks={math: {cls: math, kwargs: {format_reward: 0.1}}, digits: {cls: toy_envs.DigitFractionEnv}}",
    )
    assert main(args) == 0, capsys.readouterr().err
    step = read_metrics(out)[1]
    for key in ("reward/mean", "reward/math/mean", "reward/digits/mean", "reward/math/accuracy", "reward/math/format_rate"):
        assert key in step, key
    assert "reward/accuracy" not in step  # the math environment's metrics are per task only
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = next(m for m in lines if "val/reward_mean" in m)
    for key in ("val/math/reward_mean", "val/digits/reward_mean", "val/math/accuracy"):
        assert key in val, key


def test_row_of_unknown_task_fails_before_model_loads(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "task": "math" if i % 2 else "chess"} for i in range(8)])

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model must not load when rows have an unknown task")

    monkeypatch.setattr("posttrain.trainer.builder.load_model_and_tokenizer", no_model_load)
    args = ["grpo", "data.task=prompts", f"data.train_path={data}", "data.validation_size=2",
            "env.tasks={math: {cls: toy_envs.DigitFractionEnv}}", f"trainer.output_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "task 'chess'" in err and "env.tasks configures only the tasks 'math'" in err


def test_mixed_math_and_code_dataset_reports_per_task_rewards(tmp_path, capsys):
    """The issue's acceptance run: math (math-verify) and code (sandboxed tests) in one run."""
    model_dir = save_tiny_model(tmp_path / "model")
    math = write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"What is {i} * 3?", "answer": 3 * i} for i in range(8)])
    code = write_jsonl(tmp_path / "code.jsonl", [
        {"prompt": f"Write f(x) returning x + {i}.", "tests": [f"assert f(1) == {1 + i}", f"assert f(2) == {2 + i}"]}
        for i in range(8)
    ])
    out = tmp_path / "run"
    args = tiny_run_args(
        model_dir, out, 1, "data.task=prompts", "data.validation_size=2", "validation.at_start=false",
        "validation.at_end=false", "checkpoint.every=0", "rollout.batch_size=16", "rollout.group_size=2",
        "trainer.mini_batch_size=16", "trainer.micro_batch_size=8", "env.timeout_s=30",
        f"data.mix=[{{path: {math}, task: math, weight: 1, answer_column: answer}}, {{path: {code}, task: code, weight: 1}}]",
        "env.tasks={math: {cls: math}, code: {cls: code, kwargs: {timeout_s: 2}}}",
    )
    assert main(args) == 0, capsys.readouterr().err
    step = read_metrics(out)[1]
    for key in ("reward/math/mean", "reward/code/mean", "reward/math/accuracy", "reward/errors"):
        assert key in step, key
    assert step["reward/errors"] == 0  # unparseable model code scores 0; it is not a reward error
