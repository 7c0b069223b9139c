"""Reading rows from data files: JSONL (line by line, each line checked before it is parsed),
JSON arrays, Parquet, saved `datasets` folders and hub datasets (``hf:NAME``)."""

from __future__ import annotations

import json
import os
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from posttrain.errors import PosttrainError

Row = dict[str, Any]

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)


# One row of a JSONL file larger than this is refused before it is parsed: no trainer uses more
# than its length limit in tokens of a row, and parsing and tokenising a row of tens of MB takes
# gigabytes of memory and minutes (such rows are almost always a broken export).
MAX_ROW_BYTES = 16 << 20


def _row_too_large(path: str, lineno: int, size: int) -> PosttrainError:
    return PosttrainError(
        f"{path}:{lineno}: the line is {size / 2**20:.1f} MiB; rows over {MAX_ROW_BYTES >> 20} MiB "
        "are refused before parsing (a trainer keeps at most its length limit in tokens of a row). "
        "Split or shorten that row, or remove it."
    )


def _not_json(path: str, lineno: int, e: json.JSONDecodeError) -> PosttrainError:
    return PosttrainError(
        f"{path}:{lineno}: not valid JSON ({e.msg}). Each line of a JSONL file must be one "
        "complete JSON object; fix or remove that line."
    )


def _not_object(path: str, lineno: int, row: Any) -> PosttrainError:
    return PosttrainError(
        f"{path}:{lineno}: expected a JSON object with named columns, got {type(row).__name__}. "
        "Write each row as {\"prompt\": ..., ...}."
    )


def _binary_file(path: str, config_key: str) -> PosttrainError:
    return PosttrainError(
        f"{config_key}: '{path}' is a binary file, not JSON lines text (it contains NUL bytes). "
        "Point it at a UTF-8 .jsonl file; Parquet files need the .parquet extension."
    )


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
            raise _binary_file(path, config_key)
        f.seek(0)
        if path.endswith(".json") and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            lines = _json_array_rows(path, f.read())
        else:
            lines = []
            for lineno, raw in enumerate(f, start=1):
                if len(raw) > MAX_ROW_BYTES:
                    raise _row_too_large(path, lineno, len(raw))
                line = _decode(raw, path, lineno, first=lineno == 1)
                if not line.strip():
                    continue
                try:
                    lines.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise _not_json(path, lineno, e) from None
    for lineno, row in lines:
        if not isinstance(row, dict):
            raise _not_object(path, lineno, row)
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
        return _read_parquet(source).to_pylist()
    raise PosttrainError(
        f"{config_key}: unsupported file extension {os.path.splitext(source)[1]!r} in {source!r}. "
        "Use .jsonl/.json (JSON lines), .parquet, a datasets save_to_disk folder, or 'hf:NAME'."
    )


def _read_parquet(source: str) -> Any:
    # Imported here: pyarrow is large (its import and its memory pools), and only parquet reads need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        raise PosttrainError(f"{source}: could not read Parquet file ({e}). Check that it is a valid Parquet file.") from None


def _read_saved_dataset(path: str, split: str, config_key: str) -> list[Row]:
    return _load_saved_dataset(path, split, config_key).to_list()


def _load_saved_dataset(path: str, split: str, config_key: str) -> Any:
    import datasets  # a required dependency, but 0.6 s to import: only runs that read such data pay it

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
    return ds


def _read_hub(name: str, split: str) -> list[Row]:
    return _read_hub_dataset(name, split).to_list()


def _read_hub_dataset(name: str, split: str) -> Any:
    import datasets  # a required dependency, but 0.6 s to import: only runs that read such data pay it

    if not name:
        raise PosttrainError("'hf:' needs a dataset name, e.g. data.train_path='hf:openai/gsm8k'.")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many unrelated types; all mean "could not load"
        raise PosttrainError(
            f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. Check the "
            "name, data.split, and network access (HF_HUB_OFFLINE=1 allows only cached datasets)."
        ) from None
    return ds


# ---- Row sources: rows read on demand, so that memory grows with the batch, not the file ----

RowCheck = Callable[[Row, int], Any]


class RowSource(Protocol):
    """Rows of a data file by position: ``row(i)`` (any order, any thread) and ``rows()`` (all in
    order, faster). ``open_rows`` makes them; ``PromptRows`` (data/stream.py) builds on them."""

    def __len__(self) -> int: ...

    def row(self, i: int) -> Row: ...

    def rows(self) -> Iterator[Row]: ...


class ListRows:
    """Rows already in memory (a JSON array file, which must be parsed whole anyway)."""

    def __init__(self, rows: list[Row]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, i: int) -> Row:
        return self._rows[i]

    def rows(self) -> Iterator[Row]:
        return iter(self._rows)


_READ_BLOCK = 1 << 20  # bytes read at once by JsonlRows.rows()


class JsonlRows:
    """A JSON-lines file read once, line by line, into an index of where each row is and its
    CRC-32 (16 bytes a row); a row is read and parsed again when asked for. Every check of
    ``read_jsonl`` runs in that one pass (a line is never held longer than it takes to parse it),
    plus ``check(row, i)`` for each row (``i``: its position among the non-blank lines), so rows
    that load cannot fail later, unless the file is edited in place while it is in use: a row
    whose bytes changed is an error naming the file (rows appended, or a `touch`, change nothing).
    A file replaced by a new one (rename, ``mv``) keeps being read from the open original."""

    def __init__(self, path: str, config_key: str = "data.train_path", check: RowCheck | None = None) -> None:
        self.path = path
        self._starts = array("q")
        self._sizes = array("I")  # rows are at most MAX_ROW_BYTES
        self._crcs = array("I")
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._scan(config_key, check)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _scan(self, config_key: str, check: RowCheck | None) -> None:
        with open(self._fd, "rb", closefd=False) as f:
            if b"\0" in f.read(8192):
                raise _binary_file(self.path, config_key)
            f.seek(0)
            offset, lineno = 0, 0
            while True:
                raw = f.readline(MAX_ROW_BYTES + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_ROW_BYTES:
                    raise _row_too_large(self.path, lineno, len(raw) + _rest_of_line(f))
                start, size, bom = offset, len(raw), 0
                offset += size
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM: not part of the row
                    start, size, bom = start + 3, size - 3, 3
                line = _decode(raw, self.path, lineno, first=lineno == 1)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _not_json(self.path, lineno, e) from None
                if not isinstance(row, dict):
                    raise _not_object(self.path, lineno, row)
                if check is not None:
                    check(row, len(self._starts))
                self._starts.append(start)
                self._sizes.append(size)
                self._crcs.append(zlib.crc32(memoryview(raw)[bom:]))

    def __len__(self) -> int:
        return len(self._starts)

    def _changed(self) -> PosttrainError:
        return PosttrainError(
            f"{self.path}: the file was edited while this run was using it: rows it had read changed (it is "
            "read again as batches need its rows). Do not edit a data file in place during a run: write a "
            "new file and point the config at it, or replace it with `mv` (the run keeps reading the file "
            "it opened)."
        )

    def _open_fd(self) -> int:
        if self._fd < 0:
            with self._lock:  # unpickled or closed: open the path again (its rows' CRCs are checked)
                if self._fd < 0:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def row(self, i: int) -> Row:
        return self._parse(os.pread(self._open_fd(), self._sizes[i], self._starts[i]), self._crcs[i])

    def _parse(self, raw: bytes | memoryview, crc: int) -> Row:
        if zlib.crc32(raw) != crc:
            raise self._changed()
        try:
            row = json.loads(str(raw, "utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._changed() from None
        if not isinstance(row, dict):
            raise self._changed()
        return row

    def rows(self) -> Iterator[Row]:
        # pread, never the descriptor's offset: several passes (generators, threads) may be under way at once.
        fd = self._open_fd()
        block, block_start = memoryview(b""), 0
        for start, size, crc in zip(self._starts, self._sizes, self._crcs):
            if start < block_start or start + size > block_start + len(block):
                if size > _READ_BLOCK:
                    yield self._parse(os.pread(fd, size, start), crc)
                    continue
                block, block_start = memoryview(os.pread(fd, _READ_BLOCK, start)), start
            yield self._parse(block[start - block_start:start - block_start + size], crc)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"], state["_lock"] = -1, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def _rest_of_line(f: Any) -> int:
    """Bytes up to and including the next newline, skipped in bounded chunks."""
    skipped = 0
    while True:
        chunk = f.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


class ArrowRows:
    """Rows of an Arrow table (Parquet) or a ``datasets.Dataset`` (memory-mapped): columnar and
    compact in memory, turned into dicts a row (or, for ``rows()``, a thousand rows) at a time."""

    def __init__(self, num_rows: int, slice_table: Callable[[int, int], Any]) -> None:
        self._num_rows = num_rows
        self._slice = slice_table  # (start, stop) -> a pyarrow.Table of those rows

    def __len__(self) -> int:
        return self._num_rows

    def row(self, i: int) -> Row:
        return self._slice(i, i + 1).to_pylist()[0]

    def rows(self) -> Iterator[Row]:
        for start in range(0, self._num_rows, 1024):
            yield from self._slice(start, min(start + 1024, self._num_rows)).to_pylist()


def open_rows(source: str, *, split: str = "train", config_key: str = "data.train_path",
              check: RowCheck | None = None) -> RowSource:
    """The rows of ``source`` (as ``read_rows`` reads them) without keeping them in memory as
    Python objects: a JSONL file becomes an index of line offsets, Parquet and ``datasets``
    sources stay Arrow tables. ``check(row, i)`` runs on every row once, in order."""
    rows: RowSource
    if source.startswith("hf:"):
        rows = _dataset_rows(_read_hub_dataset(source[3:], split))
    elif not os.path.exists(source):
        return ListRows(read_rows(source, split=split, config_key=config_key))  # raises the missing-file error
    elif os.path.isdir(source):
        rows = _dataset_rows(_load_saved_dataset(source, split, config_key))
    elif source.lower().endswith(JSON_EXTENSIONS):
        return open_jsonl(source, config_key, check)
    elif source.lower().endswith(PARQUET_EXTENSIONS):
        table = _read_parquet(source)
        rows = ArrowRows(table.num_rows, lambda start, stop: table.slice(start, stop - start))
    else:
        return ListRows(read_rows(source, split=split, config_key=config_key))  # raises the extension error
    if check is not None:
        for i, row in enumerate(rows.rows()):
            check(row, i)
    return rows


def open_jsonl(path: str, config_key: str = "data.train_path", check: RowCheck | None = None) -> RowSource:
    """``read_jsonl``'s rows as a row source: a ``JsonlRows`` index, or for a ``.json`` file holding
    one JSON array (parsed whole anyway) the rows in memory. ``check`` as for ``open_rows``."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if path.endswith(".json") and b"\0" not in head and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        rows = ListRows(read_jsonl(path, config_key))
        if check is not None:
            for i, row in enumerate(rows.rows()):
                check(row, i)
        return rows
    return JsonlRows(path, config_key, check)


def _dataset_rows(ds: Any) -> ArrowRows:
    arrow = ds.with_format("arrow")
    return ArrowRows(len(ds), lambda start, stop: arrow[start:stop])
