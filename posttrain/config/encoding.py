"""Text that must be UTF-8 before a run starts: config files (read as UTF-8) and every text
setting (each is written to config.yaml, train.log and metrics.jsonl). A ConfigError names the
file and line, or the setting, instead of a bare UnicodeDecodeError halfway through."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from posttrain.errors import ConfigError


def check_utf8_file(path: str | Path, what: str) -> None:
    """A ConfigError naming the file and line when ``path`` is not UTF-8 text (YAML files are
    read as UTF-8; a file saved in Latin-1 otherwise fails with a bare UnicodeDecodeError)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return  # the loader names a file it cannot read
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} file '{path}' is not UTF-8 text: line {line} holds the byte 0x{data[exc.start]:02x}. "
                          "Save it as UTF-8 (editors: 'save with encoding'; or `iconv -f latin1 -t utf-8`).") from None


def check_utf8_text(value: str, what: str) -> None:
    """A ConfigError when ``value`` holds bytes that are not UTF-8: a name typed or passed in
    another encoding reaches Python as lone surrogates, which no UTF-8 file (config.yaml,
    train.log, metrics.jsonl) can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(f"{what}: '{shown}' holds bytes that are not UTF-8 text (a name in another encoding). "
                          "Use a UTF-8 name (e.g. ASCII letters, digits, '-', '_').") from None


def check_utf8_settings(cfg: object) -> None:
    """check_utf8_text for every text setting of ``cfg`` (a config dataclass), named by its key."""

    def walk(node: object, key: str) -> None:
        if dataclasses.is_dataclass(node):
            children = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
        elif isinstance(node, dict):
            children = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            children = [(str(i), v) for i, v in enumerate(node)]
        else:
            if isinstance(node, str):
                check_utf8_text(node, key)
            return
        for name, value in children:
            walk(value, f"{key}.{name}" if key else name)

    walk(cfg, "")
