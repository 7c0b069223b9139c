"""Encoding errors in a config file or a setting are config errors (exit 2) that name the file or
the setting, found before anything is created; a new run that fails before it wrote anything of
its own leaves no run folder behind."""

from __future__ import annotations

import os

from helpers import save_tiny_model
from hostile.cli_helpers import assert_one_clean_line, run_cli, sft_args, write_chats


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("trainer:\n  lr: 1.0e-5\n  # café\n".encode("latin-1"))
    code, err = run_cli(capsys, ["sft", "--config", str(config), "data.train_path=x.jsonl", "--print-config"])
    assert code == 2
    assert_one_clean_line(err, f"--config file '{config}' is not UTF-8 text: line 3 holds the byte 0xe9",
                          "Save it as UTF-8")


def test_a_resumed_runs_config_that_is_not_utf8_is_named(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(b"seed: 1\n# \xff\n")
    code, err = run_cli(capsys, ["sft", "--resume", str(run_dir), "data.train_path=x.jsonl"])
    assert code == 2
    assert_one_clean_line(err, f"The run's saved config file '{run_dir / 'config.yaml'}' is not UTF-8 text: line 2")


def test_an_output_dir_that_is_not_utf8_is_refused_before_anything_is_created(tmp_path, capsys):
    # A name in Latin-1 from a shell: the command line reaches Python with a lone surrogate.
    name = os.fsdecode(b"run-caf\xe9")
    data = write_chats(tmp_path / "chats.jsonl")
    before = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, sft_args(tmp_path / "model", data, tmp_path / name, "trainer.max_steps=1"))
    assert code == 2
    assert_one_clean_line(err, "trainer.output_dir:", "run-caf\\xe9' holds bytes that are not UTF-8 text")
    assert set(os.listdir(tmp_path)) == before


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    """A bad model path fails after the run folder was made (train.log, config.yaml, the lock):
    the folder and the parents created with it are removed again."""
    data = write_chats(tmp_path / "chats.jsonl")
    code, err = run_cli(capsys, sft_args(tmp_path / "no-model", data, tmp_path / "new" / "run", "trainer.max_steps=1"))
    assert code == 1 and "no-model" in err
    assert not (tmp_path / "new").exists()


def test_a_failed_start_in_an_existing_folder_keeps_it(tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    code, _ = run_cli(capsys, sft_args(tmp_path / "no-model", data, run_dir, "trainer.max_steps=1"))
    assert code == 1
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_a_run_that_trained_keeps_its_folder_when_it_fails_later(tmp_path, capsys):
    """A metrics line is the run's own output: the folder stays, even without a checkpoint."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    code, _ = run_cli(capsys, sft_args(model_dir, data, run_dir, "trainer.max_steps=20", "trainer.lr=1e30",
                                       "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
                                       "trainer.max_skipped_steps=2"))
    assert code == 1
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / "train.log").is_file()
