"""Data files as users have them: binary, not UTF-8, one enormous line, unknown roles, fewer rows
than the validation split asks for, and a few conversations trained for many epochs."""

from __future__ import annotations

import json
import time

import pytest

from helpers import make_tokenizer, save_tiny_model
from posttrain.config.schema import ModelConfig
from posttrain.data.files import MAX_ROW_BYTES
from posttrain.data.sft import Conversation, tokenize_conversations

from hostile.cli_helpers import assert_one_clean_line, run_cli, sft_args, write_chats


def _trainer_args(command: str, data, tmp_path) -> list[str]:
    """A command reading ``data``; the model is never reached (the data fails first)."""
    if command == "grpo":
        return ["grpo", "data.task=prompts", f"data.train_path={data}", f"trainer.output_dir={tmp_path / 'run'}"]
    return [command, f"data.train_path={data}", f"trainer.output_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("command", ["grpo", "sft", "dpo"])
@pytest.mark.parametrize("content, fragments", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["is a binary file", "NUL bytes"]),
    ('{"prompt": "caf\u00e9"}\n'.encode("latin-1"), ["d.jsonl:1: not UTF-8 text", "byte 0xe9", "UTF-8"]),
    (b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n', ["d.jsonl:2: not UTF-8 text"]),
])
def test_undecodable_files_are_one_line_naming_file_and_line(tmp_path, capsys, command, content, fragments):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    code, err = run_cli(capsys, _trainer_args(command, data, tmp_path))
    assert code == 1
    assert_one_clean_line(err, *fragments)


def test_a_json_array_file_that_is_not_utf8(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_bytes('[{"prompt": "a"},\n {"prompt": "\u00e9"}]'.encode("latin-1"))
    code, err = run_cli(capsys, _trainer_args("grpo", data, tmp_path))
    assert code == 1
    assert_one_clean_line(err, "d.json:2: not UTF-8 text")


def test_an_enormous_line_is_refused_before_parsing(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        f.write('{"prompt": "ok", "completion": "fine"}\n')
        f.write('{"prompt": "' + "a" * (MAX_ROW_BYTES + 10) + '", "completion": "x"}\n')
    start = time.perf_counter()
    code, err = run_cli(capsys, _trainer_args("sft", data, tmp_path))
    assert time.perf_counter() - start < 10  # was 120 s and 19 GB before the size check
    assert code == 1
    assert_one_clean_line(err, "d.jsonl:2: the line is 16.0 MiB", "Split or shorten")


def test_long_conversations_are_cut_before_tokenising():
    tokenizer = make_tokenizer()
    seen: list[int] = []
    original = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return original(self, texts, *args, **kwargs)

    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "7" * 500_000}])
    short = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "7" * 20}])
    cfg = ModelConfig(use_chat_template=True)
    type(tokenizer).__call__ = spy
    try:
        examples = tokenize_conversations([conv, short], tokenizer, cfg, max_seq_len=64)
    finally:
        type(tokenizer).__call__ = original
    assert max(seen) < 64 * 12 + 1024 + 100  # max_seq_len x the longest token (12 chars) + a margin
    assert [len(ex) for ex in examples][0] == 64 and examples[0].num_loss_tokens > 0
    reference = tokenize_conversations([Conversation([conv.messages[0], {"role": "assistant", "content": "7" * 5000}])],
                                       tokenizer, cfg, max_seq_len=64)
    assert examples[0].input_ids == reference[0].input_ids  # the cut changes none of the kept tokens


@pytest.mark.parametrize("command", ["grpo", "sft", "dpo"])
def test_unknown_message_roles_are_refused(tmp_path, capsys, command):
    messages = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    row = ({"prompt": messages[:1], "chosen": "a", "rejected": "b"} if command == "dpo"
           else {"messages": messages})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row) + "\n")
    code, err = run_cli(capsys, _trainer_args(command, data, tmp_path))
    assert code == 1
    assert_one_clean_line(err, "row 1", "role 'human'", "system, user, assistant, tool", "human -> user")


def test_validation_size_larger_than_the_data_is_clamped_and_trains(tmp_path, capsys, caplog):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl", n=20)
    args = sft_args(model_dir, data, tmp_path / "run", "trainer.max_steps=1")
    args = [a for a in args if not a.startswith("data.validation_size")]  # the default: 100 > 20 rows
    with caplog.at_level("INFO"):
        code, err = run_cli(capsys, args)
    assert code == 0, err
    assert "data.validation_size=100 is not smaller than the 20 rows" in caplog.text
    assert "18 training conversations" in caplog.text


def test_sft_says_how_many_epochs_the_steps_span(tmp_path, capsys, caplog):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl", n=12)
    with caplog.at_level("INFO"):
        code, _ = run_cli(capsys, sft_args(model_dir, data, tmp_path / "run", "trainer.max_steps=12"))
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["data/epoch"] for m in lines if "loss" in m]
    assert epochs == sorted(epochs) and epochs[-1] > 2
    # The notice at the start says what the metrics then show.
    assert f"trainer.max_steps=12 spans {epochs[-1]:.3g} epochs" in caplog.text and "trainer.max_steps=0" in caplog.text
