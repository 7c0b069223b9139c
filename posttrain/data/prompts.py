"""Prompt datasets: JSONL, Parquet, `datasets` folders and hub datasets, plus the dispatcher
``load_prompt_data`` that the trainer calls for every task."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from posttrain.config.schema import DataConfig
from posttrain.data.example import DEFAULT_MATH_INSTRUCTION, PromptExample
from posttrain.errors import PosttrainError

Row = dict[str, Any]
logger = logging.getLogger("posttrain.data")

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)


# One row of a JSONL file larger than this is refused before it is parsed: no trainer uses more
# than its length limit in tokens of a row, and parsing and tokenising a row of tens of MB takes
# gigabytes of memory and minutes (such rows are almost always a broken export).
MAX_ROW_BYTES = 16 << 20
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


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


def _parse_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    ok = isinstance(value, list) and len(value) > 0
    if ok:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                ok = False
                break
    if not ok:
        raise PosttrainError(
            f"{where}: column {column!r} must be a non-empty list of {{\"role\": str, \"content\": str}} "
            f"dicts, got {_preview(value)}. Fix the row, or set data.messages_column to the right column."
        )
    check_roles(value, where, column)
    # Copy so that appending an instruction never edits the caller's rows.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_roles(messages: list[dict[str, Any]], where: str, column: str) -> None:
    """Every message role must be one the chat templates know; a typo ('asistant', 'human')
    would otherwise be rendered as is by some templates and dropped by others, silently."""
    for i, m in enumerate(messages, start=1):
        if m["role"] not in MESSAGE_ROLES:
            raise PosttrainError(
                f"{where}: column {column!r}, message {i} has role {m['role']!r}; roles must be one of "
                f"{', '.join(MESSAGE_ROLES)}. Rename it in the data (e.g. human -> user, gpt -> assistant)."
            )


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _answer_to_str(value: Any) -> str:
    # Parquet and pandas often store integer answers as floats; "18.0" would not match "18".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def rows_to_examples(rows: list[Row], cfg: DataConfig, source: str) -> list[PromptExample]:
    """Turn raw rows into prompts: ``messages_column`` (a chat list) wins over ``prompt_column``
    (a string, becoming one user message); every other column goes to metadata, and
    ``answer_column`` is also copied to ``metadata["expected_answer"]`` as a string."""
    if not rows:
        raise PosttrainError(f"{source}: the dataset is empty. Point the data path at a file with at least one row.")
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        if row.get(cfg.messages_column) is not None:
            messages = _parse_messages(row[cfg.messages_column], where, cfg.messages_column)
        elif row.get(cfg.prompt_column) is not None:
            prompt = row[cfg.prompt_column]
            if not isinstance(prompt, str):
                raise PosttrainError(
                    f"{where}: column {cfg.prompt_column!r} must be a string, got {_preview(prompt)}. "
                    "Use data.messages_column for chat lists."
                )
            messages = [{"role": "user", "content": prompt}]
        else:
            raise PosttrainError(
                f"{where}: has neither a {cfg.prompt_column!r} nor a {cfg.messages_column!r} column; "
                f"columns found: {sorted(row)}. Set data.prompt_column (a text column) or "
                "data.messages_column (a chat message list) to one of them."
            )
        metadata = {k: v for k, v in row.items() if k not in (cfg.prompt_column, cfg.messages_column)}
        if row.get(cfg.answer_column) is not None:
            metadata["expected_answer"] = _answer_to_str(row[cfg.answer_column])
        examples.append(PromptExample(messages=messages, metadata=metadata))
    return examples


def append_instruction(example: PromptExample, instruction: str) -> PromptExample:
    """Return a copy of ``example`` with ``instruction`` appended (after a space) to its last
    user message; an empty instruction returns the example unchanged."""
    if not instruction:
        return example
    messages = [dict(m) for m in example.messages]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = f"{m['content']} {instruction}" if m["content"] else instruction
            return PromptExample(messages=messages, metadata=example.metadata)
    raise PosttrainError(
        f"cannot append data.instruction: the prompt has no user message (roles: "
        f"{[m['role'] for m in messages]}). Add a user message to the row or set data.instruction=''."
    )


def split_validation(
    examples: list[PromptExample], validation_size: int, seed: int, key: str = "data.validation_size"
) -> tuple[list[PromptExample], list[PromptExample]]:
    """Carve ``validation_size`` examples off ``examples`` at random (seeded, deterministic).

    Returns (train, validation); they are disjoint by position and train keeps the file order.
    """
    if validation_size < 0:
        raise PosttrainError(f"data.validation_size must be >= 0, got {validation_size}.")
    if validation_size >= len(examples):
        # A small file with the default validation_size should train, not fail: hold out a tenth.
        clamped = len(examples) // 10
        logger.warning(
            "%s=%d is not smaller than the %d rows of the data: holding out a tenth (%d) for validation instead. "
            "Set it below the row count, or set a validation_path.", key, validation_size, len(examples), clamped,
        )
        validation_size = clamped
    # A stream separate from the sampler's ([seed, epoch]) so the two never share draws.
    rng = np.random.default_rng([seed % 2**64, 0x5EED_0F_7A1D])
    held_out = set(rng.permutation(len(examples))[:validation_size].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    validation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, validation


def _load_source(cfg: DataConfig, path: str, config_key: str) -> list[PromptExample]:
    if cfg.task == "gsm8k":
        # Imported here because the adapter itself builds on this module's readers.
        from posttrain.data.gsm8k import load_gsm8k

        return load_gsm8k(path, config_key=config_key)
    return rows_to_examples(read_rows(path, split=cfg.split, config_key=config_key), cfg, path)


def tag_task(examples: list[PromptExample], task: str) -> list[PromptExample]:
    """Examples with ``metadata["task"] = task``, except those that already name a task."""
    return [
        ex if ex.metadata.get("task") is not None
        else PromptExample(messages=ex.messages, metadata={**ex.metadata, "task": task})
        for ex in examples
    ]


def weighted_interleave(sizes: list[int], weights: list[float], seed: int, total: int | None = None) -> list[tuple[int, int]]:
    """A seeded list of ``total`` (source, row) pairs (default: ``sum(sizes)``) in which source s
    appears in the share ``weights[s] / sum(weights)`` (exactly, up to rounding), in random order.

    Rows of a source are taken from seeded permutations of it, cycled as often as needed: a small
    source with a large weight repeats, a large one with a small weight is subsampled, and no row
    repeats before every row of its source was used. Built once from the seed, the list is the
    training set that the epoch sampler then shuffles and resumes as usual.
    """
    if len(sizes) != len(weights) or not sizes or min(sizes) < 1 or min(weights) <= 0:
        raise ValueError(f"need non-empty sources and weights > 0, got sizes {sizes} and weights {weights}")
    total = sum(sizes) if total is None else total
    rng = np.random.default_rng([seed % 2**64, 0x313C_5EED])
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    # Largest remainder: the rounding leftovers go to the sources closest to their next row.
    for s in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[s] += 1
    pairs: list[tuple[int, int]] = []
    for s, (size, count) in enumerate(zip(sizes, counts.tolist())):
        rows: list[int] = []
        while len(rows) < count:
            rows += rng.permutation(size).tolist()
        pairs += [(s, r) for r in rows[:count]]
    return [pairs[i] for i in rng.permutation(len(pairs)).tolist()]


def _round_robin(parts: list[list[PromptExample]]) -> list[PromptExample]:
    """One row of each part in turn, so that truncating the list (validation.max_prompts) keeps
    every part represented."""
    out = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def load_mixed_prompt_data(cfg: DataConfig, seed: int) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, validation) of ``cfg.mix``: each source read with its own column overrides, tagged
    with its task, its validation rows carved off (or read from its validation_path); train is the
    weighted interleaving of the sources, validation takes the sources' rows in turn."""
    trains, validations, weights = [], [], []
    for i, source in enumerate(cfg.mix):
        key = f"data.mix[{i}]"
        overrides = {k: source[k] for k in ("prompt_column", "messages_column", "answer_column") if source.get(k)}
        source_cfg = dataclasses.replace(cfg, **overrides)
        path = source["path"]
        train = rows_to_examples(read_rows(path, split=cfg.split, config_key=f"{key}.path"), source_cfg, path)
        if source.get("validation_path"):
            vpath = source["validation_path"]
            validation = rows_to_examples(read_rows(vpath, split=cfg.split, config_key=f"{key}.validation_path"), source_cfg, vpath)
        else:
            size = source.get("validation_size")
            try:
                train, validation = split_validation(train, cfg.validation_size if size is None else int(size), seed,
                                                     key=f"{key}.validation_size")
            except PosttrainError as e:
                raise PosttrainError(f"{key} ({path}): {e}") from None
        trains.append(tag_task(train, source["task"]))
        validations.append(tag_task(validation, source["task"]))
        weights.append(float(source.get("weight", 1.0)))
    index = weighted_interleave([len(t) for t in trains], weights, seed)
    return [trains[s][r] for s, r in index], _round_robin(validations)


def load_prompt_data(cfg: DataConfig, seed: int) -> tuple[list[PromptExample], list[PromptExample]]:
    """Load (train, validation) prompts for ``cfg.task`` with the instruction applied.

    ``seed`` only drives the validation carve-out; the arithmetic task uses its own
    ``cfg.arithmetic.seed`` so the problems stay fixed when the training seed changes.
    """
    if cfg.task == "arithmetic":
        from posttrain.data.arithmetic import make_arithmetic_splits

        train, validation = make_arithmetic_splits(cfg.arithmetic)
        instruction = cfg.instruction or DEFAULT_MATH_INSTRUCTION
    elif cfg.task == "prompts" and cfg.mix:
        train, validation = load_mixed_prompt_data(cfg, seed)
        instruction = cfg.instruction
    elif cfg.task in ("gsm8k", "prompts"):
        if not cfg.train_path:
            example = "/path/to/gsm8k/train.jsonl" if cfg.task == "gsm8k" else "prompts.jsonl"
            raise PosttrainError(
                f"data.train_path is empty but data.task={cfg.task!r} reads its prompts from a file. "
                f"Set data.train_path (e.g. data.train_path={example}) or use data.task=arithmetic."
            )
        train = _load_source(cfg, cfg.train_path, "data.train_path")
        if cfg.validation_path:
            validation = _load_source(cfg, cfg.validation_path, "data.validation_path")
        else:
            train, validation = split_validation(train, cfg.validation_size, seed)
        instruction = cfg.instruction or (DEFAULT_MATH_INSTRUCTION if cfg.task == "gsm8k" else "")
    else:
        raise PosttrainError(f"unknown data.task {cfg.task!r}. Use one of: arithmetic, gsm8k, prompts.")
    train = [append_instruction(ex, instruction) for ex in train]
    validation = [append_instruction(ex, instruction) for ex in validation]
    return train, validation
