"""Checkpoints as a user breaks them: a corrupt latest checkpoint, a disk that fills up (a file
size limit, in a subprocess), and --resume with changed settings."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.checkpoint.validate import checkpoint_problems

from hostile.cli_helpers import assert_one_clean_line, run_cli, sft_args, write_chats

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture
def sft_run(tmp_path, capsys):
    """A finished 2-step SFT run with checkpoints of steps 1 and 2; returns a function that runs more."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"

    def run(max_steps: int, *extra: str) -> tuple[int, str]:
        return run_cli(capsys, sft_args(model_dir, data, run_dir, f"trainer.max_steps={max_steps}",
                                        "checkpoint.every=1", "checkpoint.keep_last=0", *extra))

    assert run(2)[0] == 0
    return run_dir, run


@pytest.mark.parametrize("how", ["truncate", "empty", "no_weights", "garbage_state", "wrong_typed_state"])
def test_resume_skips_a_corrupt_latest_checkpoint(sft_run, how, caplog):
    run_dir, run = sft_run
    latest = run_dir / "checkpoints" / "step_000002"
    weights, state = latest / "model.safetensors", latest / "trainer_state.json"
    if how == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "no_weights":
        weights.unlink()
    elif how == "garbage_state":
        state.write_bytes(b"\x00\x01garbage")
    else:
        state.write_text(json.dumps({"step": [2], "data": "x"}))
    with caplog.at_level("WARNING"):
        code, err = run(3, "--resume")
    assert code == 0, err
    assert "Skipping checkpoint" in caplog.text and "step_000002" in caplog.text
    assert "Resuming from" in caplog.text and "step_000001" in caplog.text
    # Steps 2 and 3 were trained again from step 1: the broken step 2 was replaced by a good one.
    assert not checkpoint_problems(latest) and not checkpoint_problems(run_dir / "checkpoints" / "step_000003")


def test_resume_from_a_named_broken_checkpoint_is_one_line(sft_run):
    run_dir, run = sft_run
    latest = run_dir / "checkpoints" / "step_000002"
    (latest / "tokenizer.json").unlink()
    (latest / "tokenizer_config.json").unlink()
    code, err = run(3, f"--resume={latest}")
    assert code == 1
    line = assert_one_clean_line(err, "no tokenizer files", "step_000001")
    assert "sentencepiece" not in line


def test_resume_with_changed_settings_keeps_the_history_and_warns(sft_run, caplog):
    run_dir, run = sft_run
    first = (run_dir / "config.yaml").read_text()
    with caplog.at_level("WARNING"):
        code, err = run(3, "--resume", "trainer.lr=1e-4")
    assert code == 0, err
    assert "Resuming with changed settings" in caplog.text
    assert "trainer.lr: 2e-05 -> 0.0001" in caplog.text and "trainer.max_steps: 2 -> 3" in caplog.text
    kept = sorted((run_dir / "config_history").glob("config-*.yaml"))
    assert [p.name for p in kept] == ["config-001.yaml"] and kept[0].read_text() == first
    assert "lr: 0.0001" in (run_dir / "config.yaml").read_text()
    caplog.clear()
    with caplog.at_level("WARNING"):  # same settings again: nothing to keep, nothing to say
        assert run(3, "--resume", "trainer.lr=1e-4")[0] == 0
    assert "changed settings" not in caplog.text
    assert len(list((run_dir / "config_history").glob("*.yaml"))) == 1


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_while_checkpointing_is_one_line_and_keeps_the_previous(sft_run, tmp_path):
    run_dir, _ = sft_run
    model_dir, data = tmp_path / "model", tmp_path / "chats.jsonl"
    size = (run_dir / "checkpoints" / "step_000002" / "model.safetensors").stat().st_size
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = sft_args(model_dir, data, run_dir, "trainer.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=1",
                    "--resume")
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as a full disk fails with ENOSPC.
    proc = subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=_limit_file_size(size // 2))
    assert proc.returncode == 1, proc.stderr
    assert_one_clean_line(proc.stderr, "Could not write the checkpoint of step 3", "step_000003",
                          "file size limit", "free on that file system", "step_000002", "is intact")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002"]  # no partial folder; keep_last pruned nothing
    assert not checkpoint_problems(run_dir / "checkpoints" / "step_000002")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_while_logging_metrics_is_one_line(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does: metrics.jsonl and train.log
    point at it."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "train.log"):
        (run_dir / name).symlink_to("/dev/full")
    code, err = run_cli(capsys, sft_args(model_dir, data, run_dir, "trainer.max_steps=2"))
    assert code == 1
    assert_one_clean_line(err, "Could not write the metrics of step", "metrics.jsonl", "the disk is full",
                          "free on that file system")
    assert err.count("cannot write") == 1 and "train.log" in err  # the log says so once, no traceback
