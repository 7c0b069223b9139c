"""Metrics sinks (JSONL, TensorBoard, W&B offline), the console line and the progress bar.

No tests/logging/__init__.py on purpose: with pytest's default import mode it would make this
module ``logging.test_metrics``, which collides with the standard library's ``logging``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.config.schema import LoggingConfig
from posttrain.errors import PosttrainError
from posttrain.logging import MetricsLogger, ProgressBar, format_console_line


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_one_flushed_line_per_log_with_converted_values(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(), run_config={"seed": 1})
    logger.log(1, {"reward/mean": torch.tensor(0.5), "count": 3, "np": np.float32(0.25), "ok": True})
    # Flushed before close: a crash right now would keep the line.
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["step"] == 1 and isinstance(record["timestamp"], float)
    assert record["reward/mean"] == 0.5 and isinstance(record["reward/mean"], float)
    assert record["count"] == 3 and record["np"] == 0.25 and record["ok"] == 1.0
    logger.log(2, {"reward/mean": 0.75}, prefix="val")
    logger.log(2, {"loss": 1.0}, prefix="train/")
    logger.close()
    logger.close()  # idempotent
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[1]["val/reward/mean"] == 0.75 and records[2]["train/loss"] == 1.0
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb_id.txt").exists()


def test_log_rejects_non_scalars_and_use_after_close(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), run_config={}) as logger:
        with pytest.raises(TypeError, match="'vec'"):
            logger.log(1, {"vec": torch.ones(3)})
    with pytest.raises(RuntimeError):
        logger.log(2, {"x": 1.0})


def test_resume_drops_later_steps_and_appends(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), run_config={}) as logger:
        for step in range(1, 6):
            logger.log(step, {"x": float(step)})
    # Simulate a crash mid-write: a cut-off last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x": ')
    with MetricsLogger(tmp_path, LoggingConfig(), run_config={}, resume_step=3) as logger:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        logger.log(4, {"x": 40.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_append_after_cut_off_line_without_resume_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x"')
    with MetricsLogger(tmp_path, LoggingConfig(), run_config={}) as logger:
        logger.log(3, {"x": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = replace(LoggingConfig(), tensorboard=True)
    with MetricsLogger(tmp_path, cfg, run_config={}) as logger:
        logger.log(1, {"reward/mean": 0.5, "note": "strings skip TensorBoard"})
        logger.log(2, {"reward/mean": 0.6})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("reward/mean")] == [1, 2]


def test_missing_tensorboard_raises_posttrain_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    cfg = replace(LoggingConfig(), tensorboard=True)
    with pytest.raises(PosttrainError, match="logging.tensorboard=false"):
        MetricsLogger(tmp_path, cfg, run_config={})


def test_missing_wandb_raises_posttrain_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = replace(LoggingConfig(), wandb=True)
    with pytest.raises(PosttrainError, match="pip install wandb"):
        MetricsLogger(tmp_path, cfg, run_config={})


def test_wandb_offline_run_lives_under_output_dir_and_resumes_same_id(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run-a"
    cfg = replace(LoggingConfig(), wandb=True, wandb_mode="offline")
    with MetricsLogger(run_dir, cfg, run_config={"seed": 7}) as logger:
        assert logger._wandb_run.name == "run-a"
        logger.log(1, {"reward/mean": 0.5})
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs, list((run_dir / "wandb").iterdir())
    # A resumed logger reuses the stored id.
    with MetricsLogger(run_dir, cfg, run_config={"seed": 7}, resume_step=1) as logger:
        assert logger._wandb_run.id == run_id


def test_format_console_line_fixed_order_and_short_numbers():
    metrics = {
        "time/step": 2.3141, "lr": 1e-5, "reward/mean": torch.tensor(0.43121), "kl": 0.0012345,
        "loss/policy": -0.012345, "reward/accuracy": 0.3125, "perf/tokens_per_s": 12345.6,
        "response/length_mean": 87.23, "entropy": 1.23456, "grad_norm": 0.52345, "unrelated": 9.0,
    }
    line = format_console_line(12, 100, metrics)
    assert line == (
        "step  12/100 | reward 0.431 | acc 0.312 | len 87.23 | loss -0.0123 | kl 0.00123 | "
        "ent 1.235 | gnorm 0.523 | lr 1e-05 | tok/s 12346 | time 2.314s"
    )
    assert format_console_line(3, 5, {}) == "step 3/5"
    assert format_console_line(1, 5, {"loss/kl": 0.5, "reward/mean": math.nan}) == "step 1/5 | reward nan | kl 0.5"


def test_progress_bar_non_tty_prints_plain_lines(capsys):
    bar = ProgressBar(total=4, initial=1, enabled=True, tty=False, plain_interval_s=3600)
    assert not bar.uses_tqdm
    bar.update(2, {"reward": 0.4312, "acc": 0.31})  # first update prints
    bar.update(3, {"reward": 0.5})  # within the interval: silent
    bar.write("metrics line")
    bar.update(4, {"reward": 0.6})  # last step always prints
    bar.close()  # already printed step 4: nothing more
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("[progress] step 2/4 (50%) elapsed ")
    assert " eta " in lines[0] and lines[0].endswith("| reward=0.431 acc=0.31")
    assert lines[1] == "metrics line"
    assert lines[2].startswith("[progress] step 4/4 (100%)") and lines[2].endswith("| reward=0.6")
    assert len(lines) == 3 and "\r" not in out.out + out.err


def test_progress_bar_disabled_only_writes(capsys):
    bar = ProgressBar(total=3, enabled=False)
    bar.update(1, {"reward": 0.1})
    bar.write("hello")
    bar.close()
    assert capsys.readouterr().out == "hello\n"


def test_progress_bar_tty_uses_tqdm(capsys):
    with ProgressBar(total=10, initial=2, tty=True, file=sys.stderr) as bar:
        assert bar.uses_tqdm
        bar.update(5, {"reward": 0.25})
        assert bar._bar.n == 5
        bar.write("above the bar")
    out = capsys.readouterr()
    assert "above the bar" in out.out
    assert "reward=0.25" in out.err and "5/10" in out.err


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_phase_shows_what_runs_and_paused_phases_leave_the_eta(capsys, monkeypatch):
    """Plain mode: a 100 s validation before step 1, then a 10 s step: the ETA of the two steps
    left is 20 s, not 220 s (the validation is not a step's time)."""
    import posttrain.logging.progress as progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = ProgressBar(total=3, enabled=True, tty=False, plain_interval_s=0)
    with bar.phase("validating", pause=True):
        clock.now += 100
    clock.now += 5
    with bar.phase("generating"):
        clock.now += 5
    bar.update(1, {"reward": 0.5})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[progress] step 0/3 (0%)") and lines[0].endswith("| validating...")
    assert lines[1].startswith("[progress] step 0/3") and lines[1].endswith("| generating...")
    assert lines[2].startswith("[progress] step 1/3 (33%) elapsed 01:50 eta 00:20 | reward=0.5"), lines[2]
    assert not lines[2].endswith("...")  # the phase ended with its block


def test_progress_phase_on_the_tty_bar_and_tqdms_rate_without_the_pause(capsys, monkeypatch):
    clock = _Clock()
    with ProgressBar(total=10, tty=True, file=sys.stderr) as bar:
        bar._bar._time = clock
        bar._bar.start_t = bar._bar.last_print_t = clock.now
        with bar.phase("validating", pause=True):
            assert "validating..." in str(bar._bar)
            clock.now += 300  # a 5-minute validation before step 1
        clock.now += 2
        bar.update(1, {"loss": 1.5})
        assert "loss=1.5" in str(bar._bar) and "validating" not in str(bar._bar)
        assert bar._bar.format_dict["elapsed"] == pytest.approx(2)  # the step's 2 s, so ETA ~18 s
        with bar.phase("saving checkpoint", pause=True):
            assert str(bar._bar).endswith("loss=1.5 | saving checkpoint...]")
    capsys.readouterr()


def test_progress_phase_disabled_is_silent(capsys):
    bar = ProgressBar(total=3, enabled=False)
    with bar.phase("generating"):
        pass
    bar.close()
    assert capsys.readouterr().out == ""
