"""Option reference generated from the config schemas: ``--help`` text and ``docs/config.md``.

Every default and help text lives once, in :mod:`posttrain.config.schema`; this module only
walks the dataclasses and formats what it finds.

``python -m posttrain.config.reference`` prints the Markdown reference of every schema in
``SCHEMAS``; ``--check docs/config.md`` exits 1 when that file is stale (used by the tests).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

from posttrain.config.commands import SCHEMAS
from posttrain.config.fields import FieldInfo, SectionInfo, format_value, iter_fields, iter_sections

HELP_WIDTH = 100
REGENERATE_COMMAND = "python -m posttrain.config.reference > docs/config.md"


def _section_of(key: str) -> str:
    return key.rpartition(".")[0]


def _grouped(schema: type) -> Iterator[tuple[SectionInfo, list[FieldInfo]]]:
    """Sections in schema order, each with its direct leaf fields (sections without leaves skipped)."""
    fields = list(iter_fields(schema))
    for section in iter_sections(schema):
        own = [f for f in fields if _section_of(f.key) == section.key.rstrip(".")]
        if own:
            yield section, own


def format_options_help(schema: type) -> str:
    """Plain-text list of every option, grouped by section (the epilog of ``posttrain grpo --help``)."""
    lines = ["Config options (YAML keys; override any of them with KEY=VALUE):"]
    for section, fields in _grouped(schema):
        name = section.key.rstrip(".")
        lines.append("")
        lines.append(f"{name}: {section.help}" if name else "top level:")
        for f in fields:
            detail = f"{f.type_name}, default {format_value(f.default)}"
            if f.choices:
                detail += "; one of: " + ", ".join(str(c) for c in f.choices)
            lines.append(f"  {f.key} ({detail})")
            lines.extend(textwrap.wrap(f.help, HELP_WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    # A '|' would end the table cell early; newlines would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference_markdown(schemas: dict[str, type]) -> str:
    """Markdown reference: per command, one table per section (key | type | default | description)."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from posttrain/config/schema.py; do not edit. Regenerate with:",
        f"     {REGENERATE_COMMAND} -->",
        "",
        "Options are set in a YAML file (`--config FILE` or a preset name such as `gsm8k`) and",
        "overridden on the command line as dotted `KEY=VALUE` pairs, e.g. `trainer.lr=1e-6` or",
        "`rollout.stop=[a,b]`. Later sources win: schema defaults, then the file, then overrides.",
    ]
    for command, schema in schemas.items():
        out += ["", f"## `posttrain {command}`"]
        for section, fields in _grouped(schema):
            name = section.key.rstrip(".")
            out += ["", f"### `{name}`" if name else "### Top level", ""]
            if section.help:
                out += [section.help, ""]
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            for f in fields:
                desc = f.help
                if f.choices:
                    desc += " Choices: " + ", ".join(f"`{c}`" for c in f.choices) + "."
                out.append(f"| `{f.key}` | {_cell(f.type_name)} | `{_cell(format_value(f.default))}` "
                           f"| {_cell(desc)} |")
    return "\n".join(out) + "\n"


def is_reference_up_to_date(path: str | Path) -> bool:
    """True when ``path`` holds exactly what :func:`config_reference_markdown` generates now."""
    file = Path(path)
    return file.is_file() and file.read_text(encoding="utf-8") == config_reference_markdown(SCHEMAS)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or with ``--check FILE`` return 1 when FILE is stale."""
    parser = argparse.ArgumentParser(prog="python -m posttrain.config.reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated text")
    args = parser.parse_args(argv)
    if args.check:
        if is_reference_up_to_date(args.check):
            return 0
        print(f"{args.check} is out of date with posttrain/config/schema.py. Regenerate it with:\n"
              f"  python -m posttrain.config.reference > {args.check}", file=sys.stderr)
        return 1
    sys.stdout.write(config_reference_markdown(SCHEMAS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
