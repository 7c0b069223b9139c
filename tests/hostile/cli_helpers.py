"""Shared pieces of the hostile CLI tests: tiny runs of every trainer and a way to call the CLI
as a user does (exit code plus what it printed on stderr)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from posttrain.cli import main
from posttrain.envs.base import Environment, EnvironmentReturn


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``posttrain ARGS``; any exception escaping main fails the test."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    """The CLI's own error lines (log records from the run are not counted)."""
    return [line for line in stderr.splitlines() if line.startswith("posttrain: ")]


def assert_one_clean_line(stderr: str, *fragments: str) -> str:
    """stderr holds exactly one ``posttrain: ...`` line, no traceback, and every fragment."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    return lines[0]


def grpo_args(model_dir, out_dir, max_steps: int, *extra: str) -> list[str]:
    return [
        "grpo", f"model.path={model_dir}", f"trainer.output_dir={out_dir}", f"trainer.max_steps={max_steps}",
        "rollout.batch_size=4", "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.mini_batch_size=4",
        "trainer.lr=1e-3", "algorithm.kl_coef=0", "data.arithmetic.difficulty=1", "data.arithmetic.num_train=16",
        "data.arithmetic.num_validation=4", "validation.every=0", "validation.at_start=false",
        "validation.at_end=false", "env.cls=toy_envs.DigitFractionEnv", "env.num_workers=0", "checkpoint.every=1",
        "checkpoint.keep_last=0", "logging.progress_bar=false", *extra,
    ]


def write_chats(path: Path, n: int = 12) -> str:
    rows = [{"messages": [{"role": "user", "content": f"what is {i}+{i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_args(model_dir, data, out_dir, *extra: str) -> list[str]:
    return [
        "sft", f"model.path={model_dir}", f"data.train_path={data}", f"trainer.output_dir={out_dir}",
        "data.max_seq_len=64", "trainer.batch_tokens=128", "trainer.micro_batch_tokens=64", "data.validation_size=2",
        "trainer.eval_every=0", "checkpoint.every=0", "logging.progress_bar=false", *extra,
    ]


def read_metrics_strict(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed as strict JSON (NaN or Infinity tokens fail)."""

    def reject(token: str):
        raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class NonFiniteRewardEnv(Environment):
    """Rewards NaN, 0.5, NaN, +inf, repeating: three of every four are not finite."""

    def __init__(self) -> None:
        self.calls = 0

    def step(self, message_log_batch, metadata):
        rewards = []
        for _ in message_log_batch:
            self.calls += 1
            rewards.append(math.inf if self.calls % 4 == 0 else math.nan if self.calls % 2 else 0.5)
        n = len(message_log_batch)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": ""}] * n, metadata=[dict(m) for m in metadata],
            next_stop_strings=[None] * n, rewards=torch.tensor(rewards, dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool), answers=[None] * n,
        )
