"""One run per run folder: a second run, or a --resume while the first still runs, stops at once
with exit 2 and names the holder; a lock left by a killed run is taken over with a warning."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.trainer.run_lock import LOCK_FILE, RunFolderBusy, RunFolderLock, lock_run_folder, release_run_folder
from test_grpo_e2e import read_metrics, tiny_run_args

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _metrics_lines(run_dir: Path) -> int:
    try:
        return sum('"reward/mean"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_a_second_run_and_a_resume_on_a_busy_folder_stop_with_exit_2(tmp_path, capsys, caplog):
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    log_path = tmp_path / "first.txt"
    first_args = tiny_run_args(model_dir, run_dir, 1000, "validation.at_start=false", "env.num_workers=0")
    with open(log_path, "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "posttrain", *first_args], cwd=tmp_path, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _metrics_lines(run_dir) >= 1 or first.poll() is not None, 60, "the first run's step 1")
        assert first.poll() is None, log_path.read_text()
        config_before = (run_dir / "config.yaml").read_text()

        started = time.monotonic()
        assert main(tiny_run_args(model_dir, run_dir, 3, "env.num_workers=0", "trainer.lr=5e-4")) == 2
        assert main(tiny_run_args(model_dir, run_dir, 3, "env.num_workers=0", "--resume")) == 2
        assert time.monotonic() - started < 30  # at once: before any model is loaded
        err = capsys.readouterr().err
        assert err.count(f"is in use by process {first.pid} on host {socket.gethostname()}") == 2, err
        assert "set trainer.output_dir to another folder" in err
        assert (run_dir / "config.yaml").read_text() == config_before  # neither start touched the run
        assert not (run_dir / "config_history").exists()
    finally:
        first.kill()
        first.wait(timeout=30)

    # Killed (SIGKILL, no clean release): the next run takes the folder over and says from whom.
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    steps = sorted(read_metrics(run_dir))
    with caplog.at_level(logging.WARNING, logger="posttrain.trainer"):
        assert main(tiny_run_args(model_dir, run_dir, max(steps) + 1, "env.num_workers=0", "--resume")) == 0
    assert f"Taking over the run folder {run_dir} from process {first.pid}" in caplog.text
    assert (run_dir / LOCK_FILE).read_text() == ""  # a clean end leaves no holder behind


def test_stale_record_is_taken_over_with_a_warning_and_release_frees_the_folder(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "old-node", "pid": 4242, "started": "2026-12-07 10:00:00"}))
    with caplog.at_level(logging.WARNING, logger="posttrain.trainer"):
        lock_run_folder(tmp_path)
    assert "from process 4242 on host old-node, started 2026-12-07 10:00:00" in caplog.text
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # Held: another open of the file (another run, here in this process) is refused.
    with pytest.raises(RunFolderBusy, match=f"in use by process {os.getpid()}"):
        RunFolderLock(tmp_path).acquire()
    release_run_folder()
    other = RunFolderLock(tmp_path)
    other.acquire()  # free again, with no warning about a stale holder
    other.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_unreadable_record_does_not_stop_a_run(tmp_path):
    (tmp_path / LOCK_FILE).write_bytes(b"\xff\xfe not json")
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    lock.release()
