"""Damaged run files (a non-UTF-8 line, bad JSON, a non-integer step) cost their own lines, named
with file and line number: --resume, report and view go on with what they could read."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.logging.metrics import truncate_jsonl
from posttrain.logging.run_files import read_step_records


def tiny_run_args(model_dir, out_dir, max_steps, *extra):
    """A tiny GRPO run on CPU (as tests/trainer/test_grpo_e2e.py's)."""
    return ["grpo", f"model.path={model_dir}", f"trainer.output_dir={out_dir}", f"trainer.max_steps={max_steps}",
            "rollout.batch_size=8", "rollout.group_size=4", "rollout.max_new_tokens=12", "trainer.mini_batch_size=4",
            "trainer.micro_batch_size=2", "trainer.lr=1e-3", "data.arithmetic.difficulty=2",
            "data.arithmetic.num_train=64", "data.arithmetic.num_validation=8", "validation.max_prompts=4",
            "validation.every=0", "env.cls=toy_envs.DigitFractionEnv", "logging.progress_bar=false", *extra]


def test_each_bad_line_is_named_and_the_rest_is_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"step": 1, "loss": 0.5}\n'
        b'{"step": 2, "loss": "\xff\xfe"}\n'          # line 2: not UTF-8
        b'{"step": 3, "loss": \n'                      # line 3: not JSON (not the last line: damage, not a crash)
        b'[1, 2]\n'                                    # line 4: not an object
        b'{"step": "three", "loss": 0.1}\n'            # line 5: step not an integer
        b'{"loss": 0.1}\n'                             # line 6: no step
        b'\n'
        b'{"step": 4.0, "loss": NaN}\n'                # an integral float step; Python's NaN token
        b'{"step": -1}\n'                              # line 9: negative
        b'{"step": 5, "lo'                             # the last line, cut off by a crash: skipped quietly
    )
    records, problems = read_step_records(path)
    assert [r["step"] for r in records] == [1, 4] and isinstance(records[1]["step"], int)
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 9"]
    assert "not UTF-8" in problems[0] and "not JSON" in problems[1] and "'three'" in problems[3]


def test_resume_truncation_keeps_the_readable_lines_and_warns(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "a": 1}\n\xff\n{"step": "x"}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n')
    with caplog.at_level(logging.WARNING, logger="posttrain.logging"):
        truncate_jsonl(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert f"{path}: skipped 2 unreadable lines (line 2: not UTF-8 text" in caplog.text
    assert "line 3: 'step' is not an integer" in caplog.text


def test_resume_report_and_view_go_on_past_damaged_lines(tmp_path, capsys, caplog):
    pytest.importorskip("matplotlib")
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    common = ("env.num_workers=0", "checkpoint.every=1", "logging.samples_every=1", "validation.at_start=false")
    assert main(tiny_run_args(model_dir, run_dir, 2, *common)) == 0
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(run_dir / name, "ab") as f:  # damage in the middle of each file
            f.write(b'{"step": 1, "bad": "\xff"}\n{"step": "two"}\n')
    capsys.readouterr()

    # In-process the run above set up logging; `posttrain view` alone prints these on stderr.
    with caplog.at_level(logging.WARNING, logger="posttrain.report"):
        assert main(["view", str(run_dir), "--step", "2"]) == 0
    assert "samples.jsonl: skipped 2 unreadable lines (line" in caplog.text and "not UTF-8 text" in caplog.text
    assert "step 2" in capsys.readouterr().out.lower()
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="posttrain.report"):
        assert main(["report", str(run_dir), "--output", str(tmp_path / "report")]) == 0
    assert "metrics.jsonl: skipped 2 unreadable lines" in caplog.text and "shown without them" in caplog.text
    assert (tmp_path / "report" / "report.html").is_file()
    caplog.clear()

    # trainer_state.json of the latest checkpoint with a non-integer step: resume names the file
    # and goes back to the newest complete checkpoint.
    state = run_dir / "checkpoints" / "step_000002" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": "2"'))
    with caplog.at_level(logging.WARNING):
        assert main(tiny_run_args(model_dir, run_dir, 3, *common, "--resume")) == 0
    assert "trainer_state.json: 'step' must be an integer >= 0, got '2'" in caplog.text
    assert "Resuming from" in caplog.text and "step_000001, the newest complete checkpoint" in caplog.text
    assert "metrics.jsonl: skipped 2 unreadable lines" in caplog.text
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3]
