"""Loading prompt files (JSONL, Parquet, save_to_disk, hf:), metadata, instructions and errors."""

from __future__ import annotations

import json

import pytest

from posttrain.config.schema import DataConfig
from posttrain.data import DEFAULT_MATH_INSTRUCTION, PromptExample, load_prompt_data, split_validation
from posttrain.errors import PosttrainError

PROMPT_ROWS = [{"prompt": f"Question {i}?", "expected_answer": i, "source": "unit", "id": i} for i in range(10)]
MESSAGE_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}"}], "gold": str(i)}
    for i in range(10)
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def write_saved(path, rows) -> str:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def cfg(**kw) -> DataConfig:
    kw.setdefault("task", "prompts")
    kw.setdefault("validation_size", 2)
    return DataConfig(**kw)


@pytest.mark.parametrize("writer,name", [(write_jsonl, "p.jsonl"), (write_parquet, "p.parquet"), (write_saved, "saved")])
def test_prompt_column_sources(tmp_path, writer, name):
    path = writer(tmp_path / name, PROMPT_ROWS)
    train, val = load_prompt_data(cfg(train_path=path), seed=0)
    assert len(train) == 8 and len(val) == 2
    ex = train[0]
    assert isinstance(ex, PromptExample)
    assert ex.messages == [{"role": "user", "content": f"Question {ex.metadata['id']}?"}]
    assert ex.metadata["source"] == "unit"
    assert ex.metadata["expected_answer"] == str(ex.metadata["id"])
    assert "prompt" not in ex.metadata


@pytest.mark.parametrize("writer,name", [(write_jsonl, "m.jsonl"), (write_parquet, "m.parquet"), (write_saved, "saved")])
def test_messages_column_sources(tmp_path, writer, name):
    path = writer(tmp_path / name, MESSAGE_ROWS)
    train, val = load_prompt_data(cfg(train_path=path, answer_column="gold", instruction="Answer briefly."), seed=0)
    for ex in train + val:
        assert ex.messages[0] == {"role": "system", "content": "Be brief."}
        assert ex.messages[1]["role"] == "user"
        assert ex.messages[1]["content"] == f"Q{ex.metadata['gold']} Answer briefly."
        assert ex.metadata["expected_answer"] == ex.metadata["gold"]
        assert "messages" not in ex.metadata


def test_validation_path_and_instruction(tmp_path):
    train_path = write_jsonl(tmp_path / "t.jsonl", PROMPT_ROWS)
    val_path = write_jsonl(tmp_path / "v.json", PROMPT_ROWS[:3])
    train, val = load_prompt_data(cfg(train_path=train_path, validation_path=val_path, instruction="Be exact."), seed=0)
    assert len(train) == 10 and len(val) == 3
    assert train[0].messages[0]["content"] == "Question 0? Be exact."
    # 'prompts' adds nothing when the instruction is empty.
    train, _ = load_prompt_data(cfg(train_path=train_path, validation_path=val_path), seed=0)
    assert train[0].messages[0]["content"] == "Question 0?"


def test_json_array_file_and_float_answers(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "x", "expected_answer": 18.0}, {"prompt": "y"}]))
    train, val = load_prompt_data(cfg(train_path=str(tmp_path / "a.json"), validation_size=0), seed=0)
    assert val == [] and train[0].metadata["expected_answer"] == "18"
    assert "expected_answer" not in train[1].metadata


def test_hf_prefix_uses_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PROMPT_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, val = load_prompt_data(cfg(train_path="hf:org/name", split="test"), seed=0)
    assert calls == [("org/name", "test")] and len(train) == 8


def test_hf_failure_is_explained(monkeypatch):
    import datasets

    def broken(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(PosttrainError, match="could not load dataset 'org/x'.*data.split"):
        load_prompt_data(cfg(train_path="hf:org/x"), seed=0)


def test_validation_carve_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    a_train, a_val = load_prompt_data(cfg(train_path=path, validation_size=3), seed=7)
    b_train, b_val = load_prompt_data(cfg(train_path=path, validation_size=3), seed=7)
    ids = lambda exs: [e.metadata["id"] for e in exs]  # noqa: E731
    assert ids(a_val) == ids(b_val) and ids(a_train) == ids(b_train)
    assert set(ids(a_train)).isdisjoint(ids(a_val)) and len(set(ids(a_train) + ids(a_val))) == 10
    assert ids(a_train) == sorted(ids(a_train))  # train keeps the file order
    vals = {tuple(ids(load_prompt_data(cfg(train_path=path, validation_size=3), seed=s)[1])) for s in range(6)}
    assert len(vals) > 1


def test_split_validation_clamps_a_size_the_data_cannot_give(caplog):
    exs = [PromptExample([{"role": "user", "content": f"q{i}"}], {}) for i in range(30)]
    with caplog.at_level("WARNING", logger="posttrain.data"):
        train, val = split_validation(exs, 200, seed=0)
    assert (len(train), len(val)) == (27, 3)  # a tenth held out
    assert "validation_size=200" in caplog.text and "30 rows" in caplog.text
    train, val = split_validation(exs[:3], 3, seed=0)
    assert (len(train), len(val)) == (3, 0)
    with pytest.raises(PosttrainError, match=">= 0"):
        split_validation(exs, -1, seed=0)


def test_default_math_instruction_form():
    assert DEFAULT_MATH_INSTRUCTION == "Put the final answer in \\boxed{}."


# ---- errors -----------------------------------------------------------------------------------
def test_missing_file_names_config_key(tmp_path):
    with pytest.raises(PosttrainError, match=r"data\.train_path.*no such file"):
        load_prompt_data(cfg(train_path=str(tmp_path / "nope.jsonl")), seed=0)
    ok = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    with pytest.raises(PosttrainError, match=r"data\.validation_path.*no such file"):
        load_prompt_data(cfg(train_path=ok, validation_path=str(tmp_path / "v.jsonl")), seed=0)


def test_unsupported_extension(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    with pytest.raises(PosttrainError, match=r"unsupported file extension '\.csv'.*\.jsonl.*\.parquet"):
        load_prompt_data(cfg(train_path=str(tmp_path / "p.csv")), seed=0)


def test_folder_not_saved_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(PosttrainError, match="save_to_disk"):
        load_prompt_data(cfg(train_path=str(tmp_path / "d")), seed=0)


def test_bad_json_line_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n')
    with pytest.raises(PosttrainError, match=r"bad\.jsonl:3: not valid JSON"):
        load_prompt_data(cfg(train_path=str(path)), seed=0)
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(PosttrainError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_prompt_data(cfg(train_path=str(path)), seed=0)


def test_row_without_prompt_or_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"question": "b", "answer": "1"}])
    with pytest.raises(PosttrainError) as info:
        load_prompt_data(cfg(train_path=path, validation_size=0), seed=0)
    msg = str(info.value)
    assert "row 2" in msg and "['answer', 'question']" in msg
    assert "data.prompt_column" in msg and "data.messages_column" in msg


@pytest.mark.parametrize(
    "messages",
    ["just text", [], [{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]],
)
def test_malformed_messages(tmp_path, messages):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    with pytest.raises(PosttrainError, match=r"'messages' must be a non-empty list of .*role.*content"):
        load_prompt_data(cfg(train_path=path, validation_size=0), seed=0)


def test_prompt_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ["a"]}])
    with pytest.raises(PosttrainError, match="must be a string.*data.messages_column"):
        load_prompt_data(cfg(train_path=path, validation_size=0), seed=0)


def test_instruction_needs_user_message(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(PosttrainError, match="no user message"):
        load_prompt_data(cfg(train_path=path, validation_size=0, instruction="x"), seed=0)


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(PosttrainError, match="empty"):
        load_prompt_data(cfg(train_path=str(tmp_path / "e.jsonl")), seed=0)


def test_validation_size_too_large_is_clamped_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    with caplog.at_level("WARNING", logger="posttrain.data"):
        train, val = load_prompt_data(cfg(train_path=path, validation_size=10), seed=0)
    assert (len(train), len(val)) == (9, 1)
    assert "data.validation_size=10 is not smaller than the 10 rows" in caplog.text


@pytest.mark.parametrize("task", ["gsm8k", "prompts"])
def test_empty_train_path(task):
    with pytest.raises(PosttrainError, match=rf"data\.train_path is empty.*data\.task='{task}'"):
        load_prompt_data(DataConfig(task=task), seed=0)


def test_unknown_task():
    with pytest.raises(PosttrainError, match="arithmetic, gsm8k, prompts"):
        load_prompt_data(DataConfig(task="chess"), seed=0)


def test_arithmetic_task_gets_default_instruction():
    c = DataConfig(task="arithmetic")
    c.arithmetic.num_train, c.arithmetic.num_validation = 30, 6
    train, val = load_prompt_data(c, seed=0)
    assert len(train) == 30 and len(val) == 6
    assert all(ex.messages[-1]["content"].endswith(" " + DEFAULT_MATH_INSTRUCTION) for ex in train + val)
    c.instruction = "Answer with a number."
    train, _ = load_prompt_data(c, seed=0)
    assert train[0].messages[-1]["content"].endswith("? Answer with a number.")


def test_saved_dataset_dict_uses_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PROMPT_ROWS), "test": datasets.Dataset.from_list(PROMPT_ROWS[:4])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train, val = load_prompt_data(cfg(train_path=str(tmp_path / "dd"), split="test", validation_size=1), seed=0)
    assert len(train) + len(val) == 4
    with pytest.raises(PosttrainError, match=r"splits \['test', 'train'\].*data\.split"):
        load_prompt_data(cfg(train_path=str(tmp_path / "dd"), split="dev"), seed=0)
