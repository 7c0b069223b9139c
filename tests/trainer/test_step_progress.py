"""What a run shows while it runs: the progress bar names the part of the step that runs
(generating, training) and the work between steps (validating, saving checkpoint), which the
ETA leaves out; and the lr logged for a step is the lr its updates used (read before the
scheduler moves on)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.logging.progress import ProgressBar

from hostile.cli_helpers import grpo_args
from test_ppo import ppo_args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def _metrics(run_dir) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "lr" in m}


@pytest.fixture
def phases(monkeypatch):
    """The labels of ProgressBar.phase in the order the recipe entered them, with their pause flag."""
    seen: list[tuple[str, bool]] = []
    real = ProgressBar.phase

    @contextmanager
    def recording(self, label, pause=False):
        seen.append((label, pause))
        with real(self, label, pause):
            yield

    monkeypatch.setattr(ProgressBar, "phase", recording)
    return seen


def _record_lr(monkeypatch, module, name: str, used: list[float]) -> None:
    real = getattr(module, name)

    def recording(model, optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(module, name, recording)


def test_grpo_phases_and_the_lr_each_step_used(model_dir, tmp_path, phases, monkeypatch):
    import posttrain.trainer.grpo as grpo

    used: list[float] = []
    _record_lr(monkeypatch, grpo, "policy_update", used)
    run_dir = tmp_path / "run"
    assert main(grpo_args(model_dir, run_dir, 3, "trainer.warmup_steps=2", "validation.at_start=true",
                          "validation.max_prompts=2", "checkpoint.every=0")) == 0
    assert phases == [("validating", True)] + [("generating", False), ("training", False)] * 3 \
        + [("saving checkpoint", True)]
    logged = [m["lr"] for _, m in sorted(_metrics(run_dir).items())]
    assert len(used) == 3 and used[0] != used[1]  # warmup: the lr after a step is the next step's
    assert logged == pytest.approx(used, rel=1e-12)


def test_ppo_logs_the_lrs_each_step_used(model_dir, tmp_path, phases, monkeypatch):
    import posttrain.trainer.ppo as ppo

    used: list[float] = []
    _record_lr(monkeypatch, ppo, "policy_update", used)
    critic_used: list[float] = []
    real_critic_update = ppo.critic_update

    def recording_critic_update(critic, critic_optimizer, *args, **kwargs):
        critic_used.append(critic_optimizer.param_groups[0]["lr"])
        return real_critic_update(critic, critic_optimizer, *args, **kwargs)

    monkeypatch.setattr(ppo, "critic_update", recording_critic_update)
    run_dir = tmp_path / "run"
    assert main(ppo_args(model_dir, run_dir, 3, "trainer.warmup_steps=2", "critic.warmup_steps=0")) == 0
    metrics = [m for _, m in sorted(_metrics(run_dir).items())]
    assert [m["lr"] for m in metrics] == pytest.approx(used, rel=1e-12) and used[0] != used[1]
    assert [m["critic/lr"] for m in metrics] == pytest.approx(critic_used, rel=1e-12)
    assert ("generating", False) in phases and ("training", False) in phases
