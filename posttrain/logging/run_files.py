"""Reading the JSONL files of a run folder (metrics.jsonl, samples.jsonl, validation_samples.jsonl)
line by line, so that one damaged line (a disk error, a hand edit, a write cut off by a crash)
costs that line, named with its file and line number, and never the whole file: resume, report
and view go on with what they could read."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

_SHOWN = 5  # problems listed in one warning; the rest are counted


def read_step_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """The JSON objects of ``path`` that have an integer ``step`` (an integral float such as 3.0
    becomes 3), in file order, and one ``"line N: why"`` for each other line. A last line cut off
    by a crash (no newline, not JSON) is skipped without a problem: every crash leaves one. Blank
    lines are skipped. A missing file is empty."""
    path = Path(path)
    if not path.is_file():
        return [], []
    records: list[dict] = []
    problems: list[str] = []
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line must not stop the lines after it
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"line {number}: not UTF-8 text (byte {exc.start + 1})")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                if raw.endswith(b"\n"):
                    problems.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
                continue  # else: the last line, cut off by a crash
            if not isinstance(record, dict):
                problems.append(f"line {number}: a JSON {type(record).__name__}, not an object")
                continue
            step = _integer_step(record.get("step"))
            if step is None:
                shown = repr(record["step"])[:40] if "step" in record else "missing"
                problems.append(f"line {number}: 'step' is not an integer >= 0 ({shown})")
                continue
            record["step"] = step
            records.append(record)
    return records, problems


def warn_skipped_lines(path: str | Path, problems: list[str], logger: logging.Logger, action: str) -> None:
    """One warning for the lines of ``path`` that were skipped; ``action`` says what became of them
    (e.g. "they are left out of the report")."""
    if not problems:
        return
    listed = "; ".join(problems[:_SHOWN]) + (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
    logger.warning("%s: skipped %d unreadable line%s (%s): %s.", path, len(problems),
                   "" if len(problems) == 1 else "s", listed, action)


def _integer_step(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 0:
        return int(value)
    return None
