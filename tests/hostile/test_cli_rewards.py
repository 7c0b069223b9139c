"""Non-finite numbers: NaN/inf rewards are failed rewards, runs whose updates are all skipped stop
with an error, and metrics.jsonl stays strict JSON whatever the values."""

from __future__ import annotations

import json
import math

import pytest

from helpers import save_tiny_model
from posttrain.config.schema import LoggingConfig
from posttrain.errors import PosttrainError
from posttrain.logging.metrics import MetricsLogger, truncate_jsonl
from posttrain.trainer.common import SkippedStepGuard

from hostile.cli_helpers import (
    assert_one_clean_line, grpo_args, read_metrics_strict, run_cli, sft_args, write_chats,
)


def test_nan_and_inf_rewards_count_as_reward_errors(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, grpo_args(model_dir, run_dir, 2, "env.cls=hostile.cli_helpers.NonFiniteRewardEnv"))
    assert code == 0, err
    steps = [m for m in read_metrics_strict(run_dir) if "reward/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["reward/errors"] == 3  # of 4 completions: NaN, 0.5, NaN, inf
        assert math.isfinite(m["reward/mean"]) and m["loss/policy"] is not None
        assert math.isfinite(m["grad_norm"]) and m["actor/skipped_updates"] == 0


def test_steps_that_skip_every_update_stop_the_run(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    # lr=1e30 is finite (accepted), but after the first update the weights overflow: every later
    # gradient is NaN and every update skipped.
    code, err = run_cli(capsys, sft_args(model_dir, data, run_dir, "trainer.max_steps=20", "trainer.lr=1e30",
                                         "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
                                         "trainer.max_skipped_steps=3"))
    assert code == 1
    assert_one_clean_line(err, "the last 3 steps skipped every optimizer update", "trainer.lr",
                          "trainer.max_skipped_steps=0")
    lines = read_metrics_strict(run_dir)
    skipped = [m for m in lines if m.get("optim/skipped_updates") == 1.0]
    assert len(skipped) == 3 and all(m["grad_norm"] is None and m["nonfinite_metrics"] >= 1 for m in skipped)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_skipped_step_guard_counts_consecutive_steps_only():
    guard = SkippedStepGuard(3)
    for step, applied in enumerate([False, False, True, False, False], start=1):
        guard.record(step, applied)
    with pytest.raises(PosttrainError, match="Stopped at step 6: the last 3 steps"):
        guard.record(6, False)
    never = SkippedStepGuard(0)
    for step in range(100):
        never.record(step, False)


def test_metrics_jsonl_is_strict_json(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(progress_bar=False), {}) as log:
        log.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3, "neg": -math.inf})
        log.log(2, {"loss": 0.5})
    first, second = read_metrics_strict(tmp_path)
    assert first["loss"] is None and first["grad_norm"] is None and first["neg"] is None
    assert first["nonfinite_metrics"] == 3 and first["lr"] == 1e-3
    assert second["loss"] == 0.5 and "nonfinite_metrics" not in second


def test_resume_rewrites_old_nan_tokens_as_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n{"step": 3, "loss": 1.0}\n')
    truncate_jsonl(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": None, "nonfinite_metrics": 1}, {"step": 2, "loss": None, "nonfinite_metrics": 1}]


def test_non_finite_scores_from_the_rollout_api_are_reward_errors():
    """httpx refuses to send NaN, but the API's JSON parser accepts the NaN token other clients send."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import torch

    from helpers import make_tiny_llama, make_tokenizer
    from posttrain.config.loader import load_config
    from posttrain.config.schema import GRPOConfig
    from posttrain.models.loading import autocast_context
    from posttrain.trainer.api_source import make_api_source
    from posttrain.trainer.rollouts import rollout_metrics

    from posttrain.server.group_queue import GroupQueue
    from posttrain.server.rollout_api import create_rollout_api_app
    from server.live import live_server

    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    with live_server(create_rollout_api_app(GroupQueue(max_groups=8, max_staleness=1))) as url:
        cfg = load_config(GRPOConfig, None, ["rollout.source=api", f"rollout.api_url={url}", "rollout.group_size=2",
                                             "rollout.batch_size=4", "trainer.mini_batch_size=4"])
        source = make_api_source(model, tok, "cpu", autocast_context(torch.device("cpu"), torch.float32),
                                 rollout=cfg.rollout, algo=cfg.algorithm, trainer=cfg.trainer, model_cfg=cfg.model,
                                 start_version=0)
    groups = [{"env": "env-a", "prompt_ids": [5, 6], "completion_ids": [[8, 9], [10]], "scores": [math.nan, 1.0],
               "logprobs": [[-0.5, -0.2], [-1.0]], "policy_version": 0},
              {"env": "env-a", "prompt_ids": [5], "completion_ids": [[11], [12]], "scores": [math.inf, 0.5],
               "logprobs": [[-0.1], [-0.3]], "policy_version": 0}]
    rollouts = source._to_rollouts(groups)
    assert rollouts.rewards.tolist() == [0.0, 1.0, 0.0, 0.5]
    assert rollout_metrics(rollouts, {}, 2)["reward/errors"] == 2
