"""GSM8K adapter: JSONL rows ``{"question", "answer"}`` whose answer ends in ``#### <number>``."""

from __future__ import annotations

import os
import re

from posttrain.data.example import PromptExample
from posttrain.data.files import Row, open_jsonl
from posttrain.data.stream import PromptRows
from posttrain.errors import PosttrainError

_MARKER = "####"
_STRIP = re.compile(r"[\s,]")


def extract_gsm8k_answer(answer_text: str) -> str:
    """Final answer of a GSM8K solution: the text after the last ``####`` without commas or
    whitespace (``"... #### 1,000"`` -> ``"1000"``)."""
    if _MARKER not in answer_text:
        raise PosttrainError(
            f"GSM8K answer has no '{_MARKER} <answer>' line: {answer_text[-80:]!r}. "
            "Use the original GSM8K files, or data.task=prompts with data.answer_column for other data."
        )
    final = _STRIP.sub("", answer_text.rsplit(_MARKER, 1)[1])
    if not final:
        raise PosttrainError(f"GSM8K answer has an empty final answer after '{_MARKER}': {answer_text[-80:]!r}.")
    return final


def load_gsm8k(path: str, *, config_key: str = "data.train_path") -> list[PromptExample]:
    """Load a GSM8K JSONL file: the question becomes the user message; metadata holds
    ``expected_answer`` (normalised final answer), ``solution`` (the full worked answer) and
    ``task="gsm8k"``. The instruction is added by ``load_prompt_data``, not here."""
    return list(open_gsm8k(path, config_key=config_key))


def open_gsm8k(path: str, *, config_key: str = "data.train_path") -> PromptRows:
    """``load_gsm8k`` as a sequence that reads each row when it is asked for (every row is checked
    here, in one pass over the file)."""
    if not path:
        raise PosttrainError(f"{config_key} is empty. Set it to a GSM8K JSONL file (e.g. gsm8k/train.jsonl).")
    if not os.path.isfile(path):
        raise PosttrainError(f"{config_key}: no such file: {path!r}. Set {config_key} to a GSM8K JSONL file.")

    def convert(row: Row, i: int) -> PromptExample:
        return _gsm8k_example(row, path, i + 1)

    rows = open_jsonl(path, config_key, check=convert)
    if not len(rows):
        raise PosttrainError(f"{path}: the GSM8K file is empty. Point {config_key} at a non-empty JSONL file.")
    return PromptRows(rows, convert)


def _gsm8k_example(row: Row, path: str, i: int) -> PromptExample:
    if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise PosttrainError(
            f"{path}: row {i} lacks string 'question' and 'answer' fields (columns found: {sorted(row)}). "
            "GSM8K rows look like {\"question\": ..., \"answer\": \"... #### 42\"}; use data.task=prompts "
            "for other layouts."
        )
    try:
        expected = extract_gsm8k_answer(row["answer"])
    except PosttrainError as e:
        raise PosttrainError(f"{path}: row {i}: {e}") from None
    return PromptExample(
        messages=[{"role": "user", "content": row["question"]}],
        metadata={"expected_answer": expected, "solution": row["answer"], "task": "gsm8k"},
    )
