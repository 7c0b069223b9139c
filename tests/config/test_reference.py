"""Generated option docs: every key documented, docs/config.md in sync with the schemas."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.reference import (
    config_reference_markdown,
    format_options_help,
    is_reference_up_to_date,
    iter_fields,
    main,
)
from posttrain.config.commands import SCHEMAS
from posttrain.config.schema import GRPOConfig, TrainerConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_iter_fields_walks_nested_sections():
    fields = {f.key: f for f in iter_fields(GRPOConfig)}
    key, type_name, default, help, choices = fields["trainer.lr"]
    assert (key, type_name, default) == ("trainer.lr", "float", TrainerConfig().lr) and help
    assert choices is None
    assert fields["data.arithmetic.difficulty"].type_name == "int"
    assert fields["model.dtype"].choices[0] == "auto"
    assert fields["env.kwargs"].default == {} and fields["rollout.stop"].type_name == "list"
    assert "trainer" not in fields  # sections are not leaves


def test_options_help_mentions_every_key():
    text = format_options_help(GRPOConfig)
    for f in iter_fields(GRPOConfig):
        assert f"  {f.key} (" in text
    assert f"  trainer.lr (float, default {TrainerConfig().lr})\n      Peak learning rate of AdamW." in text
    assert "trainer: Optimisation." in text
    assert max(len(line) for line in text.splitlines() if line.startswith("      ")) <= 100


def test_markdown_has_a_table_row_per_key():
    text = config_reference_markdown(SCHEMAS)
    for f in iter_fields(GRPOConfig):
        assert f"| `{f.key}` |" in text
    assert "### `data.arithmetic`" in text and "`bfloat16`" in text


def test_docs_config_md_is_up_to_date():
    assert is_reference_up_to_date(DOCS), (
        "docs/config.md is stale: python -m posttrain.config.reference > docs/config.md")
    assert main(["--check", str(DOCS)]) == 0


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
