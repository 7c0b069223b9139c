"""`--resume RUN` as a newcomer types it: with no other arguments it continues with the run's
saved config.yaml (overrides and --config win where given), and a resume that fails leaves the
run's config.yaml and config_history/ as they were."""

from __future__ import annotations

import shutil

import pytest
import yaml

from helpers import save_tiny_model
from posttrain.cli import RUN_CHECKPOINTS_SUBDIR, RUN_CONFIG_FILE, main, saved_run_config
from posttrain.trainer.common import CONFIG_FILE

from hostile.cli_helpers import assert_one_clean_line, run_cli, sft_args, write_chats


@pytest.fixture
def sft_run(tmp_path, capsys):
    """A finished 2-step SFT run (lr 1e-3, checkpoints of steps 1 and 2) made with many settings
    on the command line; returns the run folder."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, sft_args(model_dir, data, run_dir, "trainer.max_steps=2", "trainer.lr=1e-3",
                                         "checkpoint.every=1", "checkpoint.keep_last=0"))
    assert code == 0, err
    return run_dir


def _steps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_the_cli_spells_the_run_folder_names_as_the_trainer_does():
    from posttrain.checkpoint.manager import CHECKPOINTS_SUBDIR

    assert (RUN_CONFIG_FILE, RUN_CHECKPOINTS_SUBDIR) == (CONFIG_FILE, CHECKPOINTS_SUBDIR)


def test_saved_run_config_is_found_from_the_run_its_checkpoints_or_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_000002"):
        assert saved_run_config(str(path)) == run / "config.yaml"
    (tmp_path / "config.yaml").write_text("seed: 2\n")  # a config.yaml above the run folder is not the run's
    assert saved_run_config(str(tmp_path / "elsewhere")) is None
    assert saved_run_config(str(tmp_path / "ckpt")) is None


def test_resume_with_no_arguments_continues_with_the_saved_config(sft_run, capsys, caplog):
    before = (sft_run / "config.yaml").read_bytes()
    with caplog.at_level("WARNING"):
        code, err = run_cli(capsys, ["sft", "--resume", str(sft_run)])
    assert code == 0, err
    assert "changed settings" not in caplog.text and "No config.yaml" not in caplog.text
    assert (sft_run / "config.yaml").read_bytes() == before
    assert not (sft_run / "config_history").exists()
    assert _steps(sft_run) == ["step_000001", "step_000002"]  # max_steps=2 is done: nothing more to train


def test_an_override_wins_over_the_saved_config_and_nothing_else_changes(sft_run, capsys, caplog):
    checkpoint = sft_run / "checkpoints" / "step_000002"
    with caplog.at_level("WARNING"):
        code, err = run_cli(capsys, ["sft", "--resume", str(checkpoint), "trainer.max_steps=3"])
    assert code == 0, err
    changes = [r.getMessage() for r in caplog.records if "Resuming with changed settings" in r.getMessage()]
    assert len(changes) == 1 and "trainer.max_steps: 2 -> 3. " in changes[0], changes
    saved = yaml.safe_load((sft_run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 3 and saved["trainer"]["lr"] == 1e-3  # the run's lr, not the default
    assert _steps(sft_run) == ["step_000001", "step_000002", "step_000003"]


def test_config_wins_over_the_saved_config(sft_run, capsys, tmp_path):
    preset = tmp_path / "more.yaml"
    preset.write_text("trainer:\n  max_steps: 3\n  lr: 2.0e-3\n")
    code, err = run_cli(capsys, ["sft", "--resume", str(sft_run), "--config", str(preset), "trainer.lr=5e-4"])
    assert code == 0, err
    saved = yaml.safe_load((sft_run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 3 and saved["trainer"]["lr"] == 5e-4  # the override beats --config
    assert saved["data"]["max_seq_len"] == 64  # the rest is the run's own


def test_print_config_of_a_resume_shows_the_run_settings(sft_run, capsys):
    capsys.readouterr()
    assert main(["sft", "--resume", str(sft_run), "--print-config", "trainer.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["lr"] == 1e-3 and printed["trainer"]["max_steps"] == 7


def test_a_moved_run_folder_resumes_where_it_is_now(sft_run, capsys, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(sft_run, moved)
    code, err = run_cli(capsys, ["sft", "--resume", str(moved), "trainer.max_steps=3"])
    assert code == 0, err
    assert "step_000003" in _steps(moved) and "step_000003" not in _steps(sft_run)


@pytest.mark.parametrize("failure", ["invalid value", "data that no longer fits"])
def test_a_failed_resume_leaves_config_yaml_untouched(sft_run, capsys, caplog, tmp_path, failure):
    config = sft_run / "config.yaml"
    before = config.read_bytes()
    if failure == "invalid value":
        extra, expected_code, fragment = ["trainer.lr=-1"], 2, "trainer.lr"
    else:
        # Fails after the run folder is set up: the checkpoint's data position is for 10 training rows.
        extra, expected_code, fragment = [f"data.train_path={write_chats(tmp_path / 'fewer.jsonl', n=6)}"], 1, "sampler"
    code, err = run_cli(capsys, ["sft", "--resume", str(sft_run), "trainer.max_steps=3", *extra])
    assert code == expected_code, err
    assert_one_clean_line(err, fragment)
    assert config.read_bytes() == before
    assert not (sft_run / "config_history").exists()
    assert _steps(sft_run) == ["step_000001", "step_000002"]
    # The next, correct resume compares with the settings the checkpoints really have.
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert run_cli(capsys, ["sft", "--resume", str(sft_run), "trainer.max_steps=3"])[0] == 0
    changes = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(changes) == 1 and "trainer.max_steps: 2 -> 3. " in changes[0], changes


def test_a_resume_that_saved_a_checkpoint_before_failing_keeps_its_config(sft_run, capsys, monkeypatch):
    """A checkpoint trained with the new settings: config.yaml must describe it."""
    import posttrain.trainer.sft as sft

    real_update = sft.sft_update
    calls = []

    def update_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 4, after step 3 was checkpointed
            raise RuntimeError("boom")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(sft, "sft_update", update_then_fail)
    code, err = run_cli(capsys, ["sft", "--resume", str(sft_run), "trainer.max_steps=5"])
    assert code == 1 and "boom" in err
    assert "step_000003" in _steps(sft_run)
    assert yaml.safe_load((sft_run / "config.yaml").read_text())["trainer"]["max_steps"] == 5
    assert len(list((sft_run / "config_history").glob("config-*.yaml"))) == 1
