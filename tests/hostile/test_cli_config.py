"""Settings a new user gets wrong: refused up front with exit code 2 and one line naming the key,
for every trainer; settings that do not apply are not checked."""

from __future__ import annotations

import pytest

from posttrain.config.commands import SCHEMAS
from posttrain.config.loader import load_config
from posttrain.errors import EXIT_CONFIG, ConfigError

from hostile.cli_helpers import assert_one_clean_line, run_cli


def _command_args(command: str, tmp_path) -> list[str]:
    if command in ("sft", "dpo"):
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "a", "completion": "b", "chosen": "c", "rejected": "d"}\n')
        return [command, f"data.train_path={data}"]
    return [command]


@pytest.mark.parametrize("command", ["grpo", "ppo", "sft", "dpo"])
@pytest.mark.parametrize("override, fragment", [
    ("trainer.lr=inf", "trainer.lr=inf must be a finite number"),
    ("trainer.lr=nan", "trainer.lr=nan must be a finite number"),
    ("trainer.max_grad_norm=-inf", "trainer.max_grad_norm=-inf must be a finite number"),
    ("trainer.output_dir=/dev/null", "trainer.output_dir='/dev/null' is a file, not a folder"),
    ("model.device=tpu", "model.device='tpu' is not a device"),
    ("trainer.max_skipped_steps=-1", "trainer.max_skipped_steps=-1 must be >= 0"),
])
def test_bad_values_exit_2_before_anything_runs(tmp_path, capsys, command, override, fragment):
    code, err = run_cli(capsys, [*_command_args(command, tmp_path), override, "--print-config"])
    assert code == EXIT_CONFIG
    assert_one_clean_line(err, "posttrain: config error:", fragment)


def test_output_dir_below_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run_cli(capsys, ["grpo", f"trainer.output_dir={afile}/run", "--print-config"])
    assert code == EXIT_CONFIG
    assert_one_clean_line(err, f"'{afile}' is a file, not a folder")


def test_output_dir_file_is_refused_even_when_the_config_check_is_bypassed(tmp_path):
    # The run folder is created by start_run; a folder that turned into a file meanwhile is a clear error too.
    from posttrain.errors import PosttrainError
    from posttrain.trainer.common import start_run

    cfg = load_config(SCHEMAS["grpo"], None, [f"trainer.output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").write_text("now a file")
    with pytest.raises(PosttrainError, match="is a file"):
        start_run(cfg, None, "grpo")


def test_train_path_with_the_default_arithmetic_task_is_refused(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    for key in ("data.train_path", "data.validation_path"):
        code, err = run_cli(capsys, ["grpo", f"{key}={data}", "--print-config"])
        assert code == EXIT_CONFIG
        assert_one_clean_line(err, f"{key}='{data}' is set, but data.task=arithmetic", "data.task=prompts")
    code, _ = run_cli(capsys, ["grpo", "data.task=prompts", f"data.train_path={data}", "--print-config"])
    assert code == 0


def test_micro_batch_size_is_only_checked_where_it_is_used():
    # With the default token budget (trainer.micro_batch_tokens > 0) the policy update ignores it.
    cfg = load_config(SCHEMAS["grpo"], None, ["trainer.micro_batch_size=3"])
    assert cfg.trainer.micro_batch_size == 3
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=3 must divide trainer.mini_batch_size=128"):
        load_config(SCHEMAS["grpo"], None, ["trainer.micro_batch_size=3", "trainer.micro_batch_tokens=0"])


def test_finite_check_covers_every_float_option_of_every_schema():
    import dataclasses

    def float_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                yield from float_keys(type(default), f"{prefix}{f.name}.")
            elif isinstance(default, float):
                yield f"{prefix}{f.name}"

    for command, schema in SCHEMAS.items():
        keys = list(float_keys(schema))
        assert keys, command
        for key in keys:
            with pytest.raises(ConfigError, match=f"{key}=inf must be a finite number"):
                load_config(schema, None, [f"{key}=inf"])
