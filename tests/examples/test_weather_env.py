"""The custom-environment example in examples/weather_env: data script, reward, one GRPO step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.envs.registry import check_env_kwargs, check_required_metadata, resolve_env_class
from posttrain.errors import ConfigError

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "weather_env"
ENV_PATH = "weather_env.CelsiusToFahrenheitEnv"


@pytest.fixture
def env_importable(monkeypatch):
    """weather_env importable here (sys.path) and in spawned reward workers (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLE_DIR), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def data_file(tmp_path):
    out = tmp_path / "data" / "weather.jsonl"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE_DIR / "make_data.py"), "--out", str(out), "--num", "40", "--seed", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return out


def _conversation(answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Convert 20 degrees Celsius to Fahrenheit."},
            {"role": "assistant", "content": answer}]


def test_make_data_writes_rows_with_correct_answers(data_file):
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        assert set(row) == {"prompt", "celsius", "expected_answer"}
        assert f"{row['celsius']:g}" in row["prompt"]
        assert row["expected_answer"] == pytest.approx(row["celsius"] * 9 / 5 + 32)
    assert len({row["prompt"] for row in rows}) > 30  # varied, not one template and value


def test_step_rewards_right_answers_within_tolerance(env_importable):
    env_cls = resolve_env_class(ENV_PATH)
    assert env_cls.required_metadata == ("expected_answer",)
    env = env_cls(tolerance=0.5)
    responses = ["68", "It is 68.0 degrees Fahrenheit.", "20 C is about 68.4 F", "67.4", "70", "-68", "warm", ""]
    meta = [{"celsius": 20.0, "expected_answer": "68"}] * len(responses)
    ret = env.step([_conversation(r) for r in responses], meta)
    assert ret.rewards.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert ret.terminateds.all()
    assert ret.answers == ["68", "68", "68.4", "67.4", "70", "-68", None, None]
    assert [m["correct"] for m in ret.metadata] == [True, True, True, False, False, False, False, False]
    assert ret.metadata[0]["celsius"] == 20.0  # the row's metadata is carried on

    negative = env.step([_conversation("-40")], [{"expected_answer": "-40"}])
    assert negative.rewards.tolist() == [1.0]
    exact = env_cls(tolerance=0).step([_conversation("68.4")], [{"expected_answer": "68"}])
    assert exact.rewards.tolist() == [0.0]

    _, metrics = env.global_post_process_and_metrics({"rewards": ret.rewards, "metadata": ret.metadata})
    assert metrics == {"accuracy": 3 / 8, "answered": 6 / 8}


def test_constructor_and_metadata_checks(env_importable):
    env_cls = resolve_env_class(ENV_PATH)
    check_env_kwargs(env_cls, {"tolerance": 0.5})
    with pytest.raises(ConfigError, match="tolerance"):
        env_cls(tolerance=-1)
    with pytest.raises(ConfigError, match="tolerance"):
        env_cls(tolerance="warm")
    with pytest.raises(ConfigError, match="data.answer_column"):
        check_required_metadata(env_cls, [{"celsius": 20.0}], "training prompts")


def test_one_grpo_step_with_the_example_env(tmp_path, data_file, env_importable):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    args = [
        "grpo",
        f"model.path={model_dir}",
        f"trainer.output_dir={out}",
        "trainer.max_steps=1",
        "data.task=prompts",
        f"data.train_path={data_file}",
        "data.validation_size=4",
        "rollout.batch_size=8",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "trainer.mini_batch_size=8",
        "trainer.micro_batch_size=8",
        "algorithm.kl_coef=0",
        "validation.at_start=false",
        "validation.max_prompts=2",
        f"env.cls={ENV_PATH}",
        "env.kwargs.tolerance=0.5",
        "env.num_workers=1",
        "logging.progress_bar=false",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in lines if "reward/mean" in m)
    assert step["step"] == 1
    assert step["reward/errors"] == 0.0  # the worker imported the environment and scored every sample
    assert 0.0 <= step["reward/accuracy"] <= 1.0 and 0.0 <= step["reward/answered"] <= 1.0
    assert any("val/" in key for m in lines for key in m)  # validation at the end used the env too
    assert (out / "checkpoints" / "step_000001" / "trainer_state.json").is_file()
