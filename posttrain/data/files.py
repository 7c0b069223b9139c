"""Reading rows from data files: JSONL (line by line, each line checked before it is parsed),
JSON arrays, Parquet, saved `datasets` folders and hub datasets (``hf:NAME``)."""

from __future__ import annotations

import json
import os
from typing import Any

from posttrain.errors import PosttrainError

Row = dict[str, Any]

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)


# One row of a JSONL file larger than this is refused before it is parsed: no trainer uses more
# than its length limit in tokens of a row, and parsing and tokenising a row of tens of MB takes
# gigabytes of memory and minutes (such rows are almost always a broken export).
MAX_ROW_BYTES = 16 << 20


def read_jsonl(path: str, config_key: str = "data.train_path") -> list[Row]:
    """Read a JSON-lines file (one object per line; blank lines are skipped).

    A ``.json`` file holding one JSON array of objects is accepted too, because that is what
    ``json.dump(rows)`` and many exports produce. The one text-reading path of every data file:
    bytes are checked before parsing, so a binary file, text that is not UTF-8 or a row larger
    than MAX_ROW_BYTES is a PosttrainError naming the file, the line and the fix.
    """
    with open(path, "rb") as f:
        head = f.read(8192)
        if b"\0" in head:
            raise PosttrainError(
                f"{config_key}: '{path}' is a binary file, not JSON lines text (it contains NUL bytes). "
                "Point it at a UTF-8 .jsonl file; Parquet files need the .parquet extension."
            )
        f.seek(0)
        if path.endswith(".json") and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            lines = _json_array_rows(path, f.read())
        else:
            lines = []
            for lineno, raw in enumerate(f, start=1):
                if len(raw) > MAX_ROW_BYTES:
                    raise PosttrainError(
                        f"{path}:{lineno}: the line is {len(raw) / 2**20:.1f} MiB; rows over {MAX_ROW_BYTES >> 20} MiB "
                        "are refused before parsing (a trainer keeps at most its length limit in tokens of a row). "
                        "Split or shorten that row, or remove it."
                    )
                line = _decode(raw, path, lineno, first=lineno == 1)
                if not line.strip():
                    continue
                try:
                    lines.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PosttrainError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}). Each line of a JSONL file must be one "
                        "complete JSON object; fix or remove that line."
                    ) from None
    for lineno, row in lines:
        if not isinstance(row, dict):
            raise PosttrainError(
                f"{path}:{lineno}: expected a JSON object with named columns, got {type(row).__name__}. "
                "Write each row as {\"prompt\": ..., ...}."
            )
    return [row for _, row in lines]


def _decode(raw: bytes, path: str, lineno: int, first: bool = False) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # utf-8-sig: a BOM some editors write
    except UnicodeDecodeError as e:
        raise PosttrainError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}). Save the file "
            "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove that line."
        ) from None


def _json_array_rows(path: str, data: bytes) -> list[tuple[int, Any]]:
    text = ""
    try:
        text = data.decode("utf-8-sig")
        rows = json.loads(text)
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise PosttrainError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[e.start]:02x}). Save the file as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise PosttrainError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}). Fix the file, or write one JSON object per line."
        ) from None
    return list(enumerate(rows, start=1))


def read_rows(source: str, *, split: str = "train", config_key: str = "data.train_path") -> list[Row]:
    """Read raw rows from a JSONL/JSON/Parquet file, a ``save_to_disk`` folder or ``hf:NAME``.

    ``config_key`` names the config entry the source came from, so errors point at it.
    """
    if source.startswith("hf:"):
        return _read_hub(source[3:], split)
    if not os.path.exists(source):
        raise PosttrainError(
            f"{config_key}: no such file or folder: {source!r}. Set {config_key} to an existing "
            "JSONL/Parquet file, a datasets save_to_disk folder, or 'hf:NAME'."
        )
    if os.path.isdir(source):
        return _read_saved_dataset(source, split, config_key)
    lower = source.lower()
    if lower.endswith(JSON_EXTENSIONS):
        return read_jsonl(source, config_key)
    if lower.endswith(PARQUET_EXTENSIONS):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(source).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise PosttrainError(f"{source}: could not read Parquet file ({e}). Check that it is a valid Parquet file.") from None
    raise PosttrainError(
        f"{config_key}: unsupported file extension {os.path.splitext(source)[1]!r} in {source!r}. "
        "Use .jsonl/.json (JSON lines), .parquet, a datasets save_to_disk folder, or 'hf:NAME'."
    )


def _read_saved_dataset(path: str, split: str, config_key: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise PosttrainError(
            f"{config_key}: {path!r} is a folder but not one written by datasets' save_to_disk. "
            "Point it at such a folder or at a .jsonl/.parquet file."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PosttrainError(
                f"{path!r} holds splits {sorted(ds)} but not {split!r}. Set data.split to one of them."
            )
        ds = ds[split]
    return ds.to_list()


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    if not name:
        raise PosttrainError("'hf:' needs a dataset name, e.g. data.train_path='hf:openai/gsm8k'.")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many unrelated types; all mean "could not load"
        raise PosttrainError(
            f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. Check the "
            "name, data.split, and network access (HF_HUB_OFFLINE=1 allows only cached datasets)."
        ) from None
    return ds.to_list()
