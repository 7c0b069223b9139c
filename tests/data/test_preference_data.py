"""Preference pairs: row parsing, chat formatting, end-of-turn tokens, truncation, errors."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import make_tokenizer
from posttrain.config.dpo_schema import DPODataConfig
from posttrain.data.preference import load_preference_examples, rows_to_preference_examples, tokenize_pairs
from posttrain.errors import PosttrainError

TOK = make_tokenizer()
CFG = DPODataConfig(train_path="pairs.jsonl")


def _pairs(rows, cfg=CFG, **kwargs):
    examples = rows_to_preference_examples(rows, cfg, "pairs.jsonl")
    return tokenize_pairs(examples, TOK, **{"use_chat_template": True, **kwargs})


def _text(ids):
    return TOK.decode(ids)


def test_string_rows_follow_the_chat_template_and_end_with_end_of_turn():
    (pair,) = _pairs([{"prompt": "2+2?", "chosen": "4", "rejected": "5\n"}], system_prompt="Be brief.")
    assert _text(pair.prompt_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    # The template's end-of-turn closes each response; the newline it writes after it is dropped.
    assert _text(pair.chosen_ids) == "4<|im_end|>"
    assert _text(pair.rejected_ids) == "5\n<|im_end|>"
    assert pair.chosen_ids[-1] == TOK.eos_token_id
    # prompt + response tokens are exactly the tokenised full conversation
    full = TOK.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "4"}], tokenize=False)
    assert _text(pair.prompt_ids + pair.chosen_ids) == full.rstrip()


def test_message_lists_strip_a_repeated_prompt_and_allow_an_implicit_prompt():
    user = {"role": "user", "content": "hi"}
    rows = [
        {"prompt": [user], "chosen": [user, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go"}]},
        {"chosen": [user, {"role": "assistant", "content": "hello"}], "rejected": [user, {"role": "assistant", "content": "go"}]},
    ]
    explicit, implicit = _pairs(rows)
    for pair in (explicit, implicit):
        assert _text(pair.prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert _text(pair.chosen_ids) == "hello<|im_end|>" and _text(pair.rejected_ids) == "go<|im_end|>"


def test_multi_turn_continuation_keeps_every_turn():
    rows = [{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                       {"role": "assistant", "content": "d"}], "rejected": "x"}]
    (pair,) = _pairs(rows)
    assert _text(pair.chosen_ids) == "b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\nd<|im_end|>"


def test_raw_text_appends_eos():
    (pair,) = _pairs([{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}], use_chat_template=False)
    assert _text(pair.prompt_ids) == "Q: 1+1="
    assert pair.chosen_ids[-1] == TOK.eos_token_id and _text(pair.chosen_ids) == " 2<|im_end|>"


def test_truncation_keeps_prompt_end_and_response_start(caplog):
    rows = [{"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "no"}]
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        (pair,) = _pairs(rows, max_prompt_tokens=5, max_response_tokens=4, what="training pairs")
    assert _text(pair.prompt_ids) == "tant\n"  # the last 5 tokens: the end of the assistant header
    assert _text(pair.chosen_ids) == "0123" and _text(pair.rejected_ids) == "no<|im_end|>"
    assert "Truncated 1 prompts of 1 training pairs to data.max_prompt_tokens=5" in caplog.text
    assert "Truncated 1 chosen responses of 1 training pairs to data.max_response_tokens=4" in caplog.text


def test_identical_pairs_are_dropped(caplog):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert len(_pairs(rows)) == 1
    assert "Dropped 1 of 2" in caplog.text
    with pytest.raises(PosttrainError, match="identical"):
        _pairs(rows[:1])


@pytest.mark.parametrize("row, fragments", [
    ({"prompt": "p", "rejected": "r"}, ["row 1", "'chosen'", "data.chosen_column", "['prompt', 'rejected']"]),
    ({"question": "p", "chosen": "c", "rejected": "r"}, ["'prompt'", "data.prompt_column", "question"]),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, ["'prompt'", "must be a string or a non-empty list", "3"]),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, ["'chosen'", "data.chosen_column"]),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "x"}]}, ["'rejected'", "assistant message"]),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "p"}], "rejected": "r"},
     ["only the prompt"]),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     ["share no", "prompt column"]),
])
def test_bad_rows_name_row_column_and_fix(row, fragments):
    with pytest.raises(PosttrainError) as info:
        rows_to_preference_examples([{"prompt": "ok", "chosen": "c", "rejected": "r"}, row], CFG, "pairs.jsonl")
    message = str(info.value).replace("row 2", "row 1")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_custom_columns_and_validation_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "good": "y", "bad": "n"}) + "\n" for i in range(10)))
    cfg = DPODataConfig(train_path=str(path), validation_size=3, prompt_column="q", chosen_column="good",
                        rejected_column="bad")
    train, val = load_preference_examples(cfg, seed=0)
    assert (len(train), len(val)) == (7, 3)
    assert {ex.prompt[0]["content"] for ex in train + val} == {f"q{i}" for i in range(10)}
    assert train[0].chosen == [{"role": "assistant", "content": "y"}]
    with pytest.raises(PosttrainError, match="empty"):
        rows_to_preference_examples([], cfg, str(path))
