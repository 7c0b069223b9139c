"""The top-level rule: every exception of every command ends as one line and a documented exit
code; --debug shows the traceback instead."""

from __future__ import annotations

import errno

import pytest

import posttrain.trainer.sft as sft
from posttrain import cli
from posttrain.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_RUNTIME, ConfigError, PosttrainError

from hostile.cli_helpers import assert_one_clean_line, run_cli


@pytest.fixture
def failing_trainer(monkeypatch):
    """Make `posttrain sft` raise the exception the test sets."""
    box: dict = {}

    def train(cfg, resume_from=None):
        raise box["exc"]

    monkeypatch.setattr(sft, "train", train)
    return box


def _sft(tmp_path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return ["sft", f"data.train_path={data}", f"trainer.output_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("exc, code, fragments", [
    (RuntimeError("CUDA error: device-side assert\nmore detail"), EXIT_RUNTIME,
     ["posttrain: error: RuntimeError: CUDA error: device-side assert (run with --debug for the traceback)"]),
    (KeyError("missing"), EXIT_RUNTIME, ["KeyError: 'missing'"]),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl"), EXIT_RUNTIME,
     ["OSError: No space left on device: '/data/run/metrics.jsonl'", "free on that file system"]),
    (MemoryError(), EXIT_RUNTIME, ["posttrain: error: MemoryError: "]),
    (PosttrainError("the data is bad; fix it"), EXIT_RUNTIME, ["posttrain: error: the data is bad; fix it"]),
    (ConfigError("trainer.lr is bad"), EXIT_CONFIG, ["posttrain: config error: trainer.lr is bad"]),
])
def test_every_exception_is_one_line_with_its_exit_code(tmp_path, capsys, failing_trainer, exc, code, fragments):
    failing_trainer["exc"] = exc
    got, err = run_cli(capsys, _sft(tmp_path))
    assert got == code
    line = assert_one_clean_line(err, *fragments)
    assert "\n" not in line


def test_keyboard_interrupt_exits_130(tmp_path, capsys, failing_trainer):
    failing_trainer["exc"] = KeyboardInterrupt()
    code, err = run_cli(capsys, _sft(tmp_path))
    assert code == EXIT_INTERRUPTED and "posttrain: interrupted." in err


@pytest.mark.parametrize("where", ["front", "back"])
def test_debug_shows_the_traceback(tmp_path, capsys, failing_trainer, where):
    failing_trainer["exc"] = RuntimeError("boom")
    args = _sft(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", *args] if where == "front" else [*args, "--debug"])


def test_merge_serve_convert_errors_are_one_line(tmp_path, capsys, monkeypatch):
    code, err = run_cli(capsys, ["merge", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert code == EXIT_RUNTIME
    assert_one_clean_line(err, "posttrain: error:", "adapter")
    code, err = run_cli(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert code == EXIT_RUNTIME
    assert_one_clean_line(err, "posttrain: error:")

    import posttrain.server.cli as server_cli

    def serve(args):
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(server_cli, "serve", serve)
    code, err = run_cli(capsys, ["serve", "--port", "8000"])
    assert code == EXIT_RUNTIME
    assert_one_clean_line(err, "OSError: Address already in use")


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for line in ("exit codes:", "0    success", "1    runtime error", "2    invalid configuration", "130  interrupted",
                 "143  stopped by SIGTERM", "--debug"):
        assert line in out


def test_readme_documents_the_exit_codes():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "### Errors and exit codes" in readme and "| 130 |" in readme and "| 143 |" in readme and "--debug" in readme
