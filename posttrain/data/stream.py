"""Prompt sequences built on access, so that a run's memory grows with its batches, not its data.

``load_prompt_data`` returns these for data read from files: a ``PromptRows`` holds a row source
(an index of line offsets for JSONL, an Arrow table for Parquet and ``datasets``) and makes each
``PromptExample`` when it is asked for; the validation carve-out, the instruction, task tags,
mixtures and ``[:n]`` are views over it (numpy index arrays, a few bytes a row).
``TokenizedPrompts`` (``encode_prompts`` of such a sequence) keeps only the token ids, as one
int32 array, and the positions of the prompts it kept.

They are read-only ``Sequence``s: ``len``, ``[i]``, ``[a:b]``, iteration, and ``==`` with a list
compares item by item, so code written for lists of examples works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from posttrain.data.files import RowSource


class LazySequence(Sequence):
    """A read-only sequence whose items are made by ``_item(i)`` (``0 <= i < len``) when asked for."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _item(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return Picked(self, np.arange(len(self), dtype=np.int64)[key])
        n = len(self)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for {n} items")
        return self._item(i)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self._item(i)

    def iter_at(self, index: np.ndarray) -> Iterator[Any]:
        """Items at ``index`` (valid positions), in that order."""
        for i in index.tolist():
            yield self._item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, LazySequence)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Any) -> list:
        """Concatenation, as for lists: a list holding every item (all of them made now)."""
        if not isinstance(other, (list, tuple, LazySequence)):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: Any) -> list:
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return [*other, *self]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)} items>"


def take(items: Sequence, index: np.ndarray) -> Sequence:
    """``[items[i] for i in index]``: a list for a list, a view for a lazy sequence."""
    if isinstance(items, LazySequence):
        return Picked(items, index)
    return [items[i] for i in index.tolist()]


class PromptRows(LazySequence):
    """``convert(row, i)`` of each row of ``rows``, made when asked for."""

    def __init__(self, rows: RowSource, convert: Callable[[Any, int], Any]) -> None:
        self.rows = rows
        self.convert = convert

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, i: int) -> Any:
        return self.convert(self.rows.row(i), i)

    def __iter__(self) -> Iterator[Any]:
        for i, row in enumerate(self.rows.rows()):
            yield self.convert(row, i)

    def iter_at(self, index: np.ndarray) -> Iterator[Any]:
        # Most of the rows, in file order (the training rows of a carve-out): one read through the file.
        if len(index) * 4 >= len(self) and (len(index) < 2 or bool(np.all(index[1:] > index[:-1]))):
            wanted = np.zeros(len(self), dtype=bool)
            wanted[index] = True
            for i, row in enumerate(self.rows.rows()):
                if wanted[i]:
                    yield self.convert(row, i)
        else:
            yield from super().iter_at(index)


class Picked(LazySequence):
    """``base[index[i]]``: a subset, reordering or repetition of ``base``."""

    def __init__(self, base: Sequence, index: np.ndarray) -> None:
        if isinstance(base, Picked):  # a view of a view: one index into the first base
            base, index = base.base, base.index[index]
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def _item(self, i: int) -> Any:
        return self.base[int(self.index[i])]

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.base, LazySequence):
            return self.base.iter_at(self.index)
        return (self.base[i] for i in self.index.tolist())

    def iter_at(self, index: np.ndarray) -> Iterator[Any]:
        return Picked(self.base, self.index[index]).__iter__()


class Mapped(LazySequence):
    """``fn(base[i])``."""

    def __init__(self, base: Sequence, fn: Callable[[Any], Any]) -> None:
        self.base = base
        self.fn = fn

    def __len__(self) -> int:
        return len(self.base)

    def _item(self, i: int) -> Any:
        return self.fn(self.base[i])

    def __iter__(self) -> Iterator[Any]:
        return map(self.fn, self.base)

    def iter_at(self, index: np.ndarray) -> Iterator[Any]:
        return map(self.fn, Picked(self.base, index))


class Interleaved(LazySequence):
    """``parts[source[i]][row[i]]``: rows of several sequences in a given order."""

    def __init__(self, parts: list[Sequence], source: np.ndarray, row: np.ndarray) -> None:
        self.parts = parts
        self.source = np.asarray(source, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row)

    def _item(self, i: int) -> Any:
        return self.parts[int(self.source[i])][int(self.row[i])]


def lazy(items: Sequence) -> bool:
    """Whether ``items`` is one of these sequences (not a list held in memory)."""
    return isinstance(items, LazySequence)
