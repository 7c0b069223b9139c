"""GSM8K parsing on literal strings and on real lines of the shared test split."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from posttrain.config.schema import DataConfig
from posttrain.data import DEFAULT_MATH_INSTRUCTION, extract_gsm8k_answer, load_gsm8k, load_prompt_data
from posttrain.errors import PosttrainError

GSM8K_DIR = "/work/shared/data/gsm8k"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("So it is 1,000.\n#### 1,000", "1000"),
        ("#### -3", "-3"),
        ("Total 2.5\n####  2.5 \n", "2.5"),
        ("first #### 1\nthen #### 2", "2"),  # the last marker wins
        ("x\n#### 1 234 567", "1234567"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_extract_answer_errors():
    with pytest.raises(PosttrainError, match="no '####"):
        extract_gsm8k_answer("The answer is 4.")
    with pytest.raises(PosttrainError, match="empty final answer"):
        extract_gsm8k_answer("#### , ")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_literal_rows(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 4"}])
    (ex,) = load_gsm8k(path)
    assert ex.messages == [{"role": "user", "content": "How many?"}]
    assert ex.metadata == {"expected_answer": "4", "solution": "2+2=<<2+2=4>>4\n#### 4", "task": "gsm8k"}


def test_load_errors(tmp_path):
    with pytest.raises(PosttrainError, match=r"data\.train_path.*no such file"):
        load_gsm8k(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PosttrainError, match="row 1 lacks.*question.*answer"):
        load_gsm8k(_write(tmp_path / "a.jsonl", [{"prompt": "x"}]))
    with pytest.raises(PosttrainError, match=r"row 1: .*no '####"):
        load_gsm8k(_write(tmp_path / "b.jsonl", [{"question": "q", "answer": "4"}]))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(PosttrainError, match="empty"):
        load_gsm8k(str(tmp_path / "e.jsonl"))


def test_gsm8k_task_carves_validation_and_adds_instruction(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"w\n#### {i}"} for i in range(12)]
    path = _write(tmp_path / "g.jsonl", rows)
    train, val = load_prompt_data(DataConfig(task="gsm8k", train_path=path, validation_size=4), seed=1)
    assert len(train) == 8 and len(val) == 4
    assert {e.metadata["expected_answer"] for e in train}.isdisjoint(e.metadata["expected_answer"] for e in val)
    ex = train[0]
    assert ex.messages[0]["content"] == f"Q{ex.metadata['expected_answer']}? {DEFAULT_MATH_INSTRUCTION}"


@pytest.mark.skipif(not os.path.isdir(GSM8K_DIR), reason="shared GSM8K data not present")
def test_real_gsm8k_lines(tmp_path):
    # Copy only a few lines into the test's temp folder; the data never enters the repo.
    with open(os.path.join(GSM8K_DIR, "test.jsonl"), encoding="utf-8") as f:
        lines = list(itertools.islice(f, 5))
    path = tmp_path / "few.jsonl"
    path.write_text("".join(lines))
    examples = load_gsm8k(str(path))
    assert len(examples) == 5
    for line, ex in zip(lines, examples):
        row = json.loads(line)
        assert ex.messages[0]["content"] == row["question"]
        assert ex.metadata["solution"] == row["answer"]
        answer = ex.metadata["expected_answer"]
        assert answer and "," not in answer and answer == answer.strip()
        assert float(answer) == float(row["answer"].split("####")[-1].replace(",", ""))
    assert examples[0].metadata["expected_answer"] == "18"  # Janet's ducks
