"""train.log: it receives what the console shows (ProgressBar lines, warnings), and a second run
in the same process does not write into the first run's file."""

from __future__ import annotations

import logging

import pytest

from posttrain.logging import ProgressBar
from posttrain.logging.progress import CONSOLE_LOGGER
from posttrain.trainer.common import log_to_file


@pytest.fixture(autouse=True)
def _detach_run_logs():
    yield
    for name in ("posttrain", CONSOLE_LOGGER):
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if getattr(h, "posttrain_run_log", False)]:
            log.removeHandler(handler)
            handler.close()


def test_train_log_gets_console_lines_and_warnings(tmp_path, capsys):
    log_to_file(tmp_path / "train.log")
    with ProgressBar(10, tty=False, plain_interval_s=0.0) as progress:
        progress.write("step 1/10 | reward 0.5")
        progress.update(1, {"reward": 0.5})
    logging.getLogger("posttrain.trainer").warning("step %d: no group with differing rewards", 2)
    printed = capsys.readouterr().out
    assert "step 1/10 | reward 0.5" in printed and "[progress] step 1/10 (10%)" in printed
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].endswith(" step 1/10 | reward 0.5")  # the console's line, after the time
    assert any("[progress] step 1/10 (10%) elapsed" in line for line in lines)
    assert lines[-1].endswith("WARNING posttrain.trainer: step 2: no group with differing rewards")
    assert printed.count("step 1/10 | reward 0.5") == 1  # printed once: the logger does not echo it


def test_a_new_run_log_replaces_the_previous_one(tmp_path):
    log_to_file(tmp_path / "first.log")
    ProgressBar(1, enabled=False).write("first run")
    log_to_file(tmp_path / "second.log")
    ProgressBar(1, enabled=False).write("second run")
    assert "second run" not in (tmp_path / "first.log").read_text()
    assert "second run" in (tmp_path / "second.log").read_text()
    assert "first run" not in (tmp_path / "second.log").read_text()
