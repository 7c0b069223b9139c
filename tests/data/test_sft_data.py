"""SFT data: loss masks at exact token positions, truncation, bad rows, packing and step batching."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import make_tokenizer
from posttrain.config.schema import ModelConfig
from posttrain.config.sft_schema import SFTDataConfig
from posttrain.data.packing import (
    IGNORE_INDEX,
    TokenBudgetBatcher,
    build_micro_batches,
    group_rows,
    pack_documents,
)
from posttrain.data.sft import (
    Conversation,
    SFTExample,
    load_sft_conversations,
    parse_rows,
    tokenize_conversation,
    tokenize_conversations,
)
from posttrain.errors import PosttrainError

TOK = make_tokenizer()  # one character per token; <|im_start|>=2, <|im_end|>=3 (EOS)
CHAT = ModelConfig(use_chat_template=True)
RAW = ModelConfig(use_chat_template=False)


def trained_text(ex: SFTExample) -> list[str]:
    """The trained spans, decoded, in order."""
    spans, current = [], []
    for token, m in zip(ex.input_ids + [None], ex.loss_mask + [0]):
        if m:
            current.append(token)
        elif current:
            spans.append(TOK.decode(current))
            current = []
    return spans


def conv(*pairs) -> Conversation:
    return Conversation([{"role": r, "content": c} for r, c in pairs])


def test_messages_mask_covers_assistant_content_and_end_of_turn_exactly():
    ex = tokenize_conversation(conv(("user", "hi"), ("assistant", "yo")), TOK, CHAT)
    assert TOK.decode(ex.input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    # "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" is 21 tokens; then y, o, <|im_end|>, \n.
    assert [i for i, m in enumerate(ex.loss_mask) if m] == [21, 22, 23]
    assert ex.input_ids[23] == TOK.eos_token_id and len(ex) == 25  # the trailing newline is not trained


def test_multi_turn_masks_every_assistant_turn_and_nothing_else():
    ex = tokenize_conversation(
        conv(("system", "S"), ("user", "a"), ("assistant", "bc"), ("user", "d"), ("assistant", "e")), TOK, CHAT
    )
    assert trained_text(ex) == ["bc<|im_end|>", "e<|im_end|>"]
    header = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    start = len(TOK(header, add_special_tokens=False)["input_ids"])
    assert start == 31 and ex.loss_mask[start - 1 : start + 4] == [0, 1, 1, 1, 0]


def test_system_prompt_is_added_and_masked():
    ex = tokenize_conversation(conv(("user", "q"), ("assistant", "r")), TOK, ModelConfig(system_prompt="Be brief."))
    assert TOK.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert trained_text(ex) == ["r<|im_end|>"]


def test_prompt_completion_with_chat_template_trains_on_completion_only():
    [c] = parse_rows([{"prompt": "2+2?", "completion": "4"}], SFTDataConfig(), "mem")
    ex = tokenize_conversation(c, TOK, CHAT)
    assert trained_text(ex) == ["4<|im_end|>"]
    assert TOK.decode(ex.input_ids).startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_completion_raw_text_is_verbatim_plus_eos():
    [c] = parse_rows([{"prompt": "Q: x\nA:", "completion": " y"}], SFTDataConfig(), "mem")
    ex = tokenize_conversation(c, TOK, RAW)
    assert TOK.decode(ex.input_ids) == "Q: x\nA: y<|im_end|>"
    assert [i for i, m in enumerate(ex.loss_mask) if m] == [7, 8, 9]  # " ", "y", EOS


def test_truncation_cuts_at_the_end_counts_and_drops_answerless(caplog):
    long_answer = conv(("user", "q"), ("assistant", "x" * 50))
    long_prompt = conv(("user", "q" * 50), ("assistant", "a"))
    short = conv(("user", "q"), ("assistant", "a"))
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        out = tokenize_conversations([long_answer, long_prompt, short], TOK, CHAT, max_seq_len=30)
    assert [len(e) for e in out] == [30, 23]
    assert out[0].loss_mask[-1] == 1  # cut inside the answer: the kept part still trains
    assert "2 of 3 training conversations were longer than data.max_seq_len=30" in caplog.text
    assert "1 of them kept no answer token" in caplog.text
    with pytest.raises(PosttrainError, match="raise data.max_seq_len"):
        tokenize_conversations([long_prompt], TOK, CHAT, max_seq_len=30)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": "hi"}, "neither a 'messages' column nor 'prompt' and 'completion'.*columns found: \\['text'\\]"),
        ({"prompt": "hi"}, "column 'completion' must be a string, got None"),
        ({"prompt": "hi", "completion": 3}, "column 'completion' must be a string, got 3"),
        ({"messages": [{"role": "user"}]}, "column 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ],
)
def test_bad_rows_name_the_row_column_and_fix(row, match):
    with pytest.raises(PosttrainError, match=match) as info:
        parse_rows([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, row],
                   SFTDataConfig(), "data.jsonl")
    assert "data.jsonl: row 2" in str(info.value)


def test_empty_file_and_no_chat_template_are_errors(tmp_path):
    with pytest.raises(PosttrainError, match="the dataset is empty"):
        parse_rows([], SFTDataConfig(), "x.jsonl")
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(PosttrainError, match="use_chat_template=false"):
        tokenize_conversation(conv(("user", "a"), ("assistant", "b")), no_template, CHAT)


def test_load_carves_validation_and_reads_validation_path(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(10)))
    train, val = load_sft_conversations(SFTDataConfig(train_path=str(path), validation_size=3), seed=0)
    assert (len(train), len(val)) == (7, 3)
    train, val = load_sft_conversations(SFTDataConfig(train_path=str(path), validation_path=str(path)), seed=0)
    assert (len(train), len(val)) == (10, 10)


def test_pack_and_group_respect_budgets():
    assert pack_documents([5, 9, 3, 7, 2], capacity=10) == [[1], [3, 2], [0, 4]]  # first-fit decreasing
    groups = group_rows([10, 3, 9, 4], micro_batch_tokens=20)
    assert groups == [[0, 2], [3, 1]]  # 2 x 10 and 2 x 4 tokens


def example(n: int, start: int = 10) -> SFTExample:
    return SFTExample(list(range(start, start + n)), [0] * (n // 2) + [1] * (n - n // 2))


@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_hold_every_label_once_with_restarting_positions(packed):
    examples = [example(4), example(6, 40), example(3, 70)]
    batches = build_micro_batches(examples, micro_batch_tokens=10, max_seq_len=10, packed=packed, pad_token_id=0)
    assert all(b.num_slots <= 10 for b in batches)
    labels = sorted(int(t) for b in batches for t in b.labels.flatten() if t != IGNORE_INDEX)
    assert labels == [12, 13, 43, 44, 45, 71, 72]
    assert sum(b.num_real_tokens for b in batches) == 13
    for b in batches:
        assert (b.attention_mask is None) == packed
        # Every document starts at position 0, also when packed after another one.
        starts = torch.isin(b.input_ids, torch.tensor([10, 40, 70]))
        assert (b.position_ids[starts] == 0).all()
    widths = sorted(tuple(b.input_ids.shape) for b in batches)
    assert widths == ([(1, 3), (1, 10)] if packed else [(1, 6), (2, 4)])  # rows 6+4 | 3, or 6 | 4 and 3


def test_token_budget_batcher_budget_epochs_and_exact_resume():
    lengths = [3, 5, 2, 7, 4, 6]
    batcher = TokenBudgetBatcher(lengths, batch_tokens=10, seed=1)
    steps = [batcher.next_step() for _ in range(4)]
    assert all(sum(lengths[i] for i in s) <= 10 for s in steps)
    flat = [i for s in steps for i in s]
    assert sorted(flat[:6]) == list(range(6))  # the first epoch hands out every document once
    resumed = TokenBudgetBatcher(lengths, batch_tokens=10, seed=1)
    for _ in range(2):
        resumed.next_step()
    state = json.loads(json.dumps(resumed.state_dict()))
    fresh = TokenBudgetBatcher(lengths, batch_tokens=10, seed=1)
    fresh.load_state_dict(state)
    assert [fresh.next_step() for _ in range(2)] == steps[2:]
    one_epoch = TokenBudgetBatcher(lengths, 10, seed=1).steps_for_epochs(1)
    assert 3 <= one_epoch <= 6 and TokenBudgetBatcher(lengths, 10, seed=1).steps_for_epochs(2) > one_epoch


def test_epoch_bounded_steps_end_with_their_epoch_and_never_repeat_a_document():
    lengths = [3, 5, 2, 7, 4, 6]  # 27 tokens
    bounded = TokenBudgetBatcher(lengths, batch_tokens=10, seed=1, epoch_bounded=True)
    steps = [bounded.next_step() for _ in range(bounded.steps_for_epochs(2))]
    for step in steps:
        assert len(set(step)) == len(step) and sum(lengths[i] for i in step) <= 10
    flat = [i for s in steps for i in s]
    assert sorted(flat[:6]) == sorted(flat[6:]) == list(range(6))  # exactly two passes
    assert bounded.epochs_done == 2.0
    # Resume in the middle, with a pending document, continues exactly.
    first = TokenBudgetBatcher(lengths, 10, seed=1, epoch_bounded=True)
    first.next_step()
    resumed = TokenBudgetBatcher(lengths, 10, seed=1, epoch_bounded=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.next_step() for _ in range(len(steps) - 1)] == steps[1:]


def test_data_smaller_than_a_step_is_one_pass_per_step_unless_steps_cross_epochs():
    lengths = [40, 39, 41, 38, 40, 39, 40, 38]  # 315 tokens, as the 8 conversations
    bounded = TokenBudgetBatcher(lengths, batch_tokens=16384, seed=0, epoch_bounded=True)
    assert bounded.steps_for_epochs(1) == 1 and bounded.epochs_for_steps(1) == 1.0
    assert sorted(bounded.next_step()) == list(range(8))
    assert bounded.steps_for_epochs(3) == 3
    crossing = TokenBudgetBatcher(lengths, batch_tokens=16384, seed=0)
    assert crossing.steps_for_epochs(1) == 1 and len(crossing.next_step()) > 400  # 52 epochs in one step
