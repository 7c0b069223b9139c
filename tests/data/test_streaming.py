"""Prompt data read on demand (issue 32): ``load_prompt_data`` of a file returns sequences that
read each row when asked for, and ``encode_prompts`` of them keeps only token ids. They must hold
exactly the prompts, in exactly the order, that the lists held before (the sampler's order and
resume depend on it)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
from helpers import make_tokenizer

from posttrain.config.schema import DataConfig
from posttrain.data.chat import TokenizedPrompts, encode_prompts
from posttrain.data.files import MAX_ROW_BYTES, JsonlRows, read_jsonl, read_rows
from posttrain.data.gsm8k import load_gsm8k
from posttrain.data.prompts import (
    _round_robin,
    append_instruction,
    load_prompt_data,
    rows_to_examples,
    split_validation,
    tag_task,
    weighted_interleave,
)
from posttrain.data.sampler import EpochSampler
from posttrain.data.stream import LazySequence, Picked
from posttrain.envs.registry import check_required_metadata, check_task_data
from posttrain.errors import ConfigError, PosttrainError


def write_jsonl(path, rows, newline="\n") -> str:
    path.write_text("".join(json.dumps(r) + newline for r in rows))
    return str(path)


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + {i % 7}?", "expected_answer": 2 * i, "id": i} for i in range(offset, offset + n)]


def eager(path: str, cfg: DataConfig, seed: int):
    """What load_prompt_data returned before it streamed: lists."""
    examples = rows_to_examples(read_rows(path), cfg, path)
    train, val = split_validation(examples, cfg.validation_size, seed)
    return [append_instruction(ex, cfg.instruction) for ex in train], [append_instruction(ex, cfg.instruction) for ex in val]


@pytest.mark.parametrize("instruction", ["", "Answer briefly."])
def test_a_jsonl_file_loads_lazily_and_equals_the_lists_it_replaced(tmp_path, instruction):
    path = write_jsonl(tmp_path / "p.jsonl", rows(300))
    cfg = DataConfig(task="prompts", train_path=path, validation_size=25, instruction=instruction)
    train, val = load_prompt_data(cfg, seed=11)
    assert isinstance(train, LazySequence) and isinstance(val, LazySequence)
    want_train, want_val = eager(path, cfg, 11)
    assert len(train) == 275 and len(val) == 25
    assert list(train) == want_train and list(val) == want_val  # iteration
    assert [train[i] for i in range(len(train))] == want_train  # random access
    assert train[-1] == want_train[-1] and list(train[5:9]) == want_train[5:9] and list(val[:4]) == want_val[:4]
    assert train == want_train  # == with a list, item by item
    with pytest.raises(IndexError):
        train[275]


def test_the_sampler_draws_the_same_prompts_from_the_encoded_sequence(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", rows(200) + [{"prompt": "x" * 400, "expected_answer": 0}])
    cfg = DataConfig(task="prompts", train_path=path, validation_size=20)
    tokenizer = make_tokenizer()
    train, _ = load_prompt_data(cfg, seed=3)
    encode = {"use_chat_template": True, "max_prompt_tokens": 64}
    lazy_prompts = encode_prompts(train, tokenizer, **encode)
    list_prompts = encode_prompts(list(train), tokenizer, **encode)
    assert isinstance(lazy_prompts, TokenizedPrompts) and isinstance(list_prompts, list)
    assert len(lazy_prompts) == len(list_prompts) == 180  # the long row is dropped by both
    batches = []
    for prompts in (lazy_prompts, list_prompts):
        sampler = EpochSampler(len(prompts), 16, seed=3)
        sampler.next_batch()
        state = sampler.state_dict()
        resumed = EpochSampler(len(prompts), 16, seed=3)
        resumed.load_state_dict(state)
        batches.append([prompts[i] for _ in range(30) for i in resumed.next_batch()])
    assert batches[0] == batches[1]
    assert all(type(p.token_ids) is list and type(p.token_ids[0]) is int for p in batches[0])
    assert list(lazy_prompts) == list_prompts


def test_encoding_a_lazy_sequence_warns_and_fails_as_for_a_list(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", rows(20) + [{"prompt": "y" * 300, "expected_answer": 1}])
    train, _ = load_prompt_data(DataConfig(task="prompts", train_path=path, validation_size=2), seed=0)
    tokenizer = make_tokenizer()
    messages = []
    for examples in (train, list(train)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="posttrain.data"):
            encode_prompts(examples, tokenizer, use_chat_template=True, max_prompt_tokens=40, what="training prompts")
        messages.append([r.getMessage() for r in caplog.records])
    assert messages[0] == messages[1] and "Dropped" in messages[0][0]
    for examples in (train, list(train)):
        with pytest.raises(PosttrainError, match="Every one of the training prompts"):
            encode_prompts(examples, tokenizer, use_chat_template=True, max_prompt_tokens=3, what="training prompts")


def test_gsm8k_and_parquet_sources_stream_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": f"Q{i}?", "answer": f"work\n#### {i:,}"} for i in range(1500, 1530)])
    cfg = DataConfig(task="gsm8k", train_path=gsm, validation_size=5)
    train, val = load_prompt_data(cfg, seed=1)
    want_train, want_val = split_validation(load_gsm8k(gsm), 5, 1)
    instruction = train[0].messages[-1]["content"].split("? ", 1)[1]
    assert list(train) == [append_instruction(ex, instruction) for ex in want_train]
    assert list(val) == [append_instruction(ex, instruction) for ex in want_val]
    assert train[0].metadata["expected_answer"].isdigit()

    parquet = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(rows(40)), parquet)
    cfg = DataConfig(task="prompts", train_path=parquet, validation_size=4)
    train, val = load_prompt_data(cfg, seed=2)
    assert isinstance(train, LazySequence)
    assert (list(train), list(val)) == eager(parquet, cfg, 2)
    assert train[7] == eager(parquet, cfg, 2)[0][7]


def test_a_mix_streams_and_keeps_the_order_of_the_lists(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows(60))
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"Say {i}", "kw": str(i)} for i in range(9)])
    mix = [{"path": a, "task": "math", "weight": 3}, {"path": b, "task": "words", "weight": 1, "prompt_column": "question",
                                                       "answer_column": "kw", "validation_size": 2}]
    cfg = DataConfig(task="prompts", validation_size=6, instruction="Go.", mix=mix)
    train, val = load_prompt_data(cfg, seed=9)
    # The lists the mix was built from before it streamed.
    parts, vals = [], []
    for source, size in ((mix[0], 6), (mix[1], 2)):
        source_cfg = replace(cfg, **{k: source[k] for k in ("prompt_column", "answer_column") if k in source})
        t, v = split_validation(rows_to_examples(read_rows(source["path"]), source_cfg, source["path"]), size, 9)
        parts.append(tag_task(t, source["task"]))
        vals.append(tag_task(v, source["task"]))
    want_train = [append_instruction(parts[s][r], "Go.") for s, r in weighted_interleave([54, 7], [3.0, 1.0], 9)]
    want_val = [append_instruction(ex, "Go.") for ex in _round_robin(vals)]
    assert list(train) == want_train and list(val) == want_val
    assert [train[i] for i in range(len(train))] == want_train


def weighted_interleave_before(sizes, weights, seed, total=None):
    """The list version that weighted_interleave replaced (it must draw the same)."""
    total = sum(sizes) if total is None else total
    rng = np.random.default_rng([seed % 2**64, 0x313C_5EED])
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    for s in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[s] += 1
    pairs = []
    for s, (size, count) in enumerate(zip(sizes, counts.tolist())):
        got = []
        while len(got) < count:
            got += rng.permutation(size).tolist()
        pairs += [(s, r) for r in got[:count]]
    return [pairs[i] for i in rng.permutation(len(pairs)).tolist()]


@pytest.mark.parametrize("sizes,weights,total", [([50, 2000, 300], [1.0, 1.0, 2.0], None), ([3, 1], [1.0, 9.0], 40),
                                                  ([7], [1.0], 3), ([5, 5, 5], [1.0, 1e-6, 1.0], 11)])
def test_weighted_interleave_draws_what_the_list_version_drew(sizes, weights, total):
    for seed in (0, 7, -3):
        assert weighted_interleave(sizes, weights, seed, total) == weighted_interleave_before(sizes, weights, seed, total)


def test_jsonl_rows_index_blank_lines_crlf_and_a_bom(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n  \n{"prompt": "\xc3\xa9"}\r\n{"prompt": "c"}')
    source = JsonlRows(str(path))
    assert len(source) == 3
    assert [source.row(i) for i in (2, 0, 1)] == [{"prompt": "c"}, {"prompt": "a"}, {"prompt": "é"}]
    assert list(source.rows()) == read_jsonl(str(path))
    again = pickle.loads(pickle.dumps(source))  # e.g. sent to a worker process: reopens the file
    assert list(again.rows()) == list(source.rows()) and again.row(1) == {"prompt": "é"}


def test_passes_over_one_file_may_run_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.data.files._READ_BLOCK", 64)  # rows straddle blocks, some exceed one
    rows_ = rows(50) + [{"prompt": "long " * 40, "expected_answer": 1}] + rows(20, offset=50)
    source = JsonlRows(write_jsonl(tmp_path / "p.jsonl", rows_))
    first, second = source.rows(), source.rows()
    next(second)
    pairs = [(a, b) for a, b in zip(first, second)]  # two generators, interleaved: no shared file offset
    assert [a for a, _ in pairs] == rows_[:-1] and [b for _, b in pairs] == rows_[1:]
    assert source.row(50) == rows_[50] and list(source.rows()) == rows_


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a"}\n{"prompt": \n', r"p.jsonl:2: not valid JSON"),
    (b'{"prompt": "a"}\n[1, 2]\n', r"p.jsonl:2: expected a JSON object"),
    (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"p.jsonl:2: not UTF-8 text \(byte 0xff"),
    (b'\x00\x01binary', r"is a binary file"),
])
def test_jsonl_rows_refuse_what_read_jsonl_refuses(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    for read in (read_jsonl, JsonlRows):
        with pytest.raises(PosttrainError, match=message):
            read(str(path))


def test_an_oversized_line_is_measured_without_being_read_whole(tmp_path):
    path = tmp_path / "p.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "a"}\n{"prompt": "' + b"x" * (MAX_ROW_BYTES + (3 << 20)) + b'"}\n{"prompt": "b"}\n')
    with pytest.raises(PosttrainError, match=r"p.jsonl:2: the line is 19.0 MiB; rows over 16 MiB are refused"):
        JsonlRows(str(path))


def test_a_data_file_edited_in_place_during_a_run_is_an_error_naming_it(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, rows(10))
    train, _ = load_prompt_data(DataConfig(task="prompts", train_path=str(path), validation_size=2), seed=0)
    first = train[0]
    replacement = tmp_path / "new.jsonl"
    write_jsonl(replacement, rows(10, offset=100))
    os.replace(replacement, path)  # mv: the open file keeps being read
    assert train[0] == first and len(list(train)) == 8
    source = JsonlRows(str(path))
    want = list(source.rows())
    with open(path, "a") as f:  # rows appended: the rows read are unchanged
        f.write('{"prompt": "new"}\n')
    os.utime(path)
    assert list(source.rows()) == want and source.row(9) == want[9]
    with open(path, "r+b") as f:  # edited in place: one digit of row 3 (id 103) differs, still valid JSON
        data = f.read()
        f.seek(data.index(b'"What is 103'))
        f.write(b'"What is 903')
    assert source.row(2) == want[2] and source.row(4) == want[4]
    for read in (lambda: source.row(3), lambda: list(source.rows())):
        with pytest.raises(PosttrainError, match="p.jsonl: the file was edited while this run was using it"):
            read()


def test_required_metadata_checks_stream_and_keep_their_messages(tmp_path):
    class NeedsAnswer:
        required_metadata = ("expected_answer",)

    class NeedsTests:
        required_metadata = ("tests",)

    path = write_jsonl(tmp_path / "p.jsonl", rows(6) + [{"prompt": "no answer", "answer": "4"}])
    examples, _ = load_prompt_data(DataConfig(task="prompts", train_path=path, validation_path=path), seed=0)
    for items in (examples, list(examples), Picked(examples, np.arange(len(examples)))):
        with pytest.raises(ConfigError, match=r"1 of 7 training prompts lack it.*data.answer_column=answer"):
            check_required_metadata(NeedsAnswer, items, "training prompts")
        with pytest.raises(ConfigError, match=r"7 of 7 training prompts lack it \(columns of those rows besides"):
            check_task_data({"": NeedsTests}, items, "training prompts")
    tagged = tag_task(examples, "math")
    check_task_data({"math": object}, tagged, "p")
    with pytest.raises(ConfigError, match=r"7 rows have task 'math' \(of 7 p\)"):
        check_task_data({"words": object, "code": object}, tagged, "p")
    with pytest.raises(ConfigError, match=r"NeedsTests needs metadata 'tests' in every prompt row, but 7 of 7 p of task 'math'"):
        check_task_data({"math": NeedsTests, "words": object}, tagged, "p")
