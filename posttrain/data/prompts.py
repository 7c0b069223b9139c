"""Prompt datasets: JSONL, Parquet, `datasets` folders and hub datasets, plus the dispatcher
``load_prompt_data`` that the trainer calls for every task."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain.config.schema import DataConfig
from posttrain.data.arithmetic import make_arithmetic_splits
from posttrain.data.example import DEFAULT_MATH_INSTRUCTION, PromptExample
from posttrain.data.files import Row, open_rows
from posttrain.data.gsm8k import open_gsm8k
from posttrain.data.stream import Interleaved, Mapped, PromptRows, lazy, take
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.data")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

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
    return [row_to_example(row, cfg, source, i) for i, row in enumerate(rows)]


def open_examples(path: str, cfg: DataConfig, config_key: str, instruction: str = "") -> PromptRows:
    """``rows_to_examples(read_rows(path))`` as a sequence that makes each example when it is asked
    for: every row is read and checked here, once, but none is kept (see data/stream.py).
    ``instruction``: also check that it can be appended to every row (``append_instruction``)."""

    def convert(row: Row, i: int) -> PromptExample:
        return row_to_example(row, cfg, path, i)

    def check(row: Row, i: int) -> None:
        append_instruction(convert(row, i), instruction)

    rows = open_rows(path, split=cfg.split, config_key=config_key, check=check)
    if not len(rows):
        raise PosttrainError(f"{path}: the dataset is empty. Point the data path at a file with at least one row.")
    return PromptRows(rows, convert)


def row_to_example(row: Row, cfg: DataConfig, source: str, i: int) -> PromptExample:
    """The prompt of row ``i`` (0-based) of ``source``, as ``rows_to_examples`` makes it."""
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
    return PromptExample(messages=messages, metadata=metadata)


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
    examples: Sequence[PromptExample], validation_size: int, seed: int, key: str = "data.validation_size"
) -> tuple[Sequence[PromptExample], Sequence[PromptExample]]:
    """Carve ``validation_size`` examples off ``examples`` at random (seeded, deterministic).

    Returns (train, validation); they are disjoint by position and train keeps the file order.
    Lists for a list; for a lazy sequence (data/stream.py) views of it.
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
    held_out = np.zeros(len(examples), dtype=bool)
    held_out[rng.permutation(len(examples))[:validation_size]] = True
    return take(examples, np.flatnonzero(~held_out)), take(examples, np.flatnonzero(held_out))


def _load_source(cfg: DataConfig, path: str, config_key: str) -> PromptRows:
    if cfg.task == "gsm8k":
        return open_gsm8k(path, config_key=config_key)
    return open_examples(path, cfg, config_key, instruction=cfg.instruction)


def tag_task(examples: Sequence[PromptExample], task: str) -> Sequence[PromptExample]:
    """Examples with ``metadata["task"] = task``, except those that already name a task (a list
    for a list, else a lazy view)."""
    def tag(ex: PromptExample) -> PromptExample:
        if ex.metadata.get("task") is not None:
            return ex
        return PromptExample(messages=ex.messages, metadata={**ex.metadata, "task": task})

    return Mapped(examples, tag) if lazy(examples) else [tag(ex) for ex in examples]


def weighted_interleave(sizes: list[int], weights: list[float], seed: int, total: int | None = None) -> list[tuple[int, int]]:
    """A seeded list of ``total`` (source, row) pairs (default: ``sum(sizes)``) in which source s
    appears in the share ``weights[s] / sum(weights)`` (exactly, up to rounding), in random order.

    Rows of a source are taken from seeded permutations of it, cycled as often as needed: a small
    source with a large weight repeats, a large one with a small weight is subsampled, and no row
    repeats before every row of its source was used. Built once from the seed, the list is the
    training set that the epoch sampler then shuffles and resumes as usual.
    """
    source, row = weighted_interleave_arrays(sizes, weights, seed, total)
    return list(zip(source.tolist(), row.tolist()))


def weighted_interleave_arrays(sizes: list[int], weights: list[float], seed: int,
                               total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``weighted_interleave`` as two arrays, (source, row): the same pairs, 12 bytes each."""
    if len(sizes) != len(weights) or not sizes or min(sizes) < 1 or min(weights) <= 0:
        raise ValueError(f"need non-empty sources and weights > 0, got sizes {sizes} and weights {weights}")
    total = sum(sizes) if total is None else total
    rng = np.random.default_rng([seed % 2**64, 0x313C_5EED])
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    # Largest remainder: the rounding leftovers go to the sources closest to their next row.
    for s in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[s] += 1
    sources, rows = [], []
    for s, (size, count) in enumerate(zip(sizes, counts.tolist())):
        perms, drawn = [], 0
        while drawn < count:  # the same draws, in the same order, as one list grown a permutation at a time
            perms.append(rng.permutation(size))
            drawn += size
        rows.append(np.concatenate(perms)[:count] if perms else np.zeros(0, dtype=np.int64))
        sources.append(np.full(count, s, dtype=np.int32))
    source, row = np.concatenate(sources), np.concatenate(rows).astype(np.int64)
    order = rng.permutation(len(row))
    return source[order], row[order]


def _round_robin(parts: list[Sequence[PromptExample]]) -> Sequence[PromptExample]:
    """One row of each part in turn, so that truncating the list (validation.max_prompts) keeps
    every part represented."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    turn = np.arange(int(sizes.max(initial=0)))
    # Position i of the result: the turn-th row of each part that still has one, parts in order.
    present = turn[:, None] < sizes[None, :]
    source = np.broadcast_to(np.arange(len(parts)), present.shape)[present]
    row = np.broadcast_to(turn[:, None], present.shape)[present]
    if any(lazy(p) for p in parts):
        return Interleaved(list(parts), source, row)
    return [parts[s][r] for s, r in zip(source.tolist(), row.tolist())]


def load_mixed_prompt_data(cfg: DataConfig, seed: int) -> tuple[Sequence[PromptExample], Sequence[PromptExample]]:
    """(train, validation) of ``cfg.mix``: each source read with its own column overrides, tagged
    with its task, its validation rows carved off (or read from its validation_path); train is the
    weighted interleaving of the sources, validation takes the sources' rows in turn."""
    trains, validations, weights = [], [], []
    for i, source in enumerate(cfg.mix):
        key = f"data.mix[{i}]"
        overrides = {k: source[k] for k in ("prompt_column", "messages_column", "answer_column") if source.get(k)}
        source_cfg = dataclasses.replace(cfg, **overrides)
        path = source["path"]
        train = open_examples(path, source_cfg, f"{key}.path", instruction=cfg.instruction)
        if source.get("validation_path"):
            vpath = source["validation_path"]
            validation = open_examples(vpath, source_cfg, f"{key}.validation_path", instruction=cfg.instruction)
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
    source_of, row_of = weighted_interleave_arrays([len(t) for t in trains], weights, seed)
    return Interleaved(trains, source_of, row_of), _round_robin(validations)


def load_prompt_data(cfg: DataConfig, seed: int) -> tuple[Sequence[PromptExample], Sequence[PromptExample]]:
    """Load (train, validation) prompts for ``cfg.task`` with the instruction applied.

    ``seed`` only drives the validation carve-out; the arithmetic task uses its own
    ``cfg.arithmetic.seed`` so the problems stay fixed when the training seed changes.

    Data read from files comes back as read-only sequences that read each row when it is asked
    for (data/stream.py: memory grows with the batch, not the file); the arithmetic task as lists.
    """
    if cfg.task == "arithmetic":
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
    if lazy(train) or lazy(validation):
        if instruction:
            train = Mapped(train, lambda ex: append_instruction(ex, instruction))
            validation = Mapped(validation, lambda ex: append_instruction(ex, instruction))
        return train, validation
    train = [append_instruction(ex, instruction) for ex in train]
    validation = [append_instruction(ex, instruction) for ex in validation]
    return train, validation
