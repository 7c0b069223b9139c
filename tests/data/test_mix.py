"""data.mix: several prompt sources, each tagged with its task, mixed with weights."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from posttrain.config.schema import DataConfig
from posttrain.data import load_prompt_data
from posttrain.data.prompts import weighted_interleave
from posttrain.data.sampler import EpochSampler
from posttrain.errors import PosttrainError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_weighted_interleave_matches_weights_and_is_seeded():
    index = weighted_interleave([50, 2000, 300], [1.0, 1.0, 2.0], seed=3)
    assert len(index) == 2350
    counts = Counter(s for s, _ in index)
    for s, share in enumerate([0.25, 0.25, 0.5]):
        assert abs(counts[s] - share * 2350) <= 1  # exact up to rounding
    # The small source is repeated evenly, the large one subsampled without repeats.
    small = Counter(r for s, r in index if s == 0)
    assert set(small) == set(range(50)) and max(small.values()) - min(small.values()) <= 1
    assert max(Counter(r for s, r in index if s == 1).values()) == 1
    # Over a large sample of sampler batches too, the shares hold.
    sampler = EpochSampler(len(index), 64, seed=0, shuffle=True)
    drawn = Counter(index[i][0] for _ in range(30) for i in sampler.next_batch())
    assert abs(drawn[2] / sum(drawn.values()) - 0.5) < 0.05
    assert weighted_interleave([50, 2000, 300], [1.0, 1.0, 2.0], seed=3) == index
    assert weighted_interleave([50, 2000, 300], [1.0, 1.0, 2.0], seed=4) != index
    assert len(weighted_interleave([3, 4], [1, 1], seed=0, total=10)) == 10
    with pytest.raises(ValueError):
        weighted_interleave([3, 4], [1, 0], seed=0)


def test_mixed_prompt_data_tags_tasks_and_carves_validation_per_source(tmp_path):
    math = write_jsonl(tmp_path / "m.jsonl", [{"prompt": f"What is {i} + 1?", "expected_answer": i + 1} for i in range(40)])
    words = write_jsonl(tmp_path / "w.jsonl", [{"question": f"Say w{i}", "kw": f"w{i}"} for i in range(10)]
                        + [{"question": "own task", "kw": "x", "task": "custom"}])
    cfg = DataConfig(task="prompts", validation_size=3, instruction="Be brief.", mix=[
        {"path": math, "task": "math", "weight": 3},
        {"path": words, "task": "words", "weight": 1, "prompt_column": "question", "answer_column": "kw",
         "validation_size": 2},
    ])
    train, val = load_prompt_data(cfg, seed=5)
    assert len(train) == (40 - 3) + (11 - 2)
    tasks = Counter(ex.metadata["task"] for ex in train)
    assert tasks["math"] == pytest.approx(0.75 * len(train), abs=1)
    assert set(tasks) <= {"math", "words", "custom"}  # a row's own task column wins
    word_rows = [ex for ex in train if ex.metadata["task"] == "words"]
    assert word_rows and all(ex.metadata["expected_answer"] == ex.metadata["kw"] for ex in word_rows)
    assert all(ex.messages[-1]["content"].endswith(" Be brief.") for ex in train + val)
    # Validation: each source's own carve-out, alternating so a max_prompts cut keeps both tasks.
    assert Counter(ex.metadata.get("task") for ex in val)["math"] == 3 and len(val) == 5
    assert {val[0].metadata["task"], val[1].metadata["task"]} <= {"math", "words", "custom"} and val[0].metadata["task"] == "math"
    assert val[1].metadata["task"] in ("words", "custom")
    val_prompts = {ex.messages[-1]["content"] for ex in val}
    assert not val_prompts & {ex.messages[-1]["content"] for ex in train}
    again_train, again_val = load_prompt_data(cfg, seed=5)
    assert [ex.messages for ex in again_train] == [ex.messages for ex in train]
    assert [ex.messages for ex in again_val] == [ex.messages for ex in val]


def test_mixed_source_with_its_own_validation_file_and_errors(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(4)])
    a_val = write_jsonl(tmp_path / "a_val.jsonl", [{"prompt": "held out"}])
    cfg = DataConfig(task="prompts", mix=[{"path": a, "task": "a", "weight": 1, "validation_path": a_val}])
    train, val = load_prompt_data(cfg, seed=0)
    assert len(train) == 4 and [ex.metadata for ex in val] == [{"task": "a"}]
    train, val = load_prompt_data(DataConfig(task="prompts", mix=[{"path": a, "task": "a", "validation_size": 5}]), seed=0)
    assert (len(train), len(val)) == (4, 0)  # clamped to a tenth of 4 rows, with a warning
    with pytest.raises(PosttrainError, match=r"data.mix\[0\].path: no such file"):
        load_prompt_data(DataConfig(task="prompts", mix=[{"path": str(tmp_path / "x.jsonl"), "task": "a"}]), seed=0)
