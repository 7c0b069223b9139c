"""Prompts too long for data.max_prompt_tokens by their length in characters are dropped before
they are templated or tokenised; the prompts kept are those full tokenisation would keep."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers import make_tokenizer
from posttrain.data.chat import encode_prompts, prompt_char_limit

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


class RecordingTokenizer(PreTrainedTokenizerFast):
    """Records the longest text it was asked to tokenise."""

    longest_text = 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.longest_text = max([self.longest_text, *map(len, texts)])
        return super().__call__(text, *args, **kwargs)


def byte_level_bpe() -> RecordingTokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(["What is 12 + 30? Put the final answer in a box, please."] * 20, trainer)
    return RecordingTokenizer(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=TEMPLATE)


@dataclass
class Example:
    messages: list
    metadata: dict = field(default_factory=dict)


def prompt(text: str) -> Example:
    return Example([{"role": "user", "content": text}])


def test_a_huge_prompt_is_dropped_without_being_tokenised(caplog):
    tokenizer = byte_level_bpe()
    limit = prompt_char_limit(tokenizer, 32)
    assert 0 < limit < 10_000
    huge = prompt("What is 1 + 2? " * 700_000)  # 10.5 MB
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        kept = encode_prompts([prompt("What is 12 + 30?"), huge], tokenizer, use_chat_template=True,
                              max_prompt_tokens=32)
    assert len(kept) == 1 and kept[0].messages[0]["content"] == "What is 12 + 30?"
    assert tokenizer.longest_text <= limit  # the 10 MB text never reached the tokenizer
    assert time.perf_counter() - started < 5
    assert "Dropped 1 of 2 prompts longer than data.max_prompt_tokens=32 (1 of them over" in caplog.text


@pytest.mark.parametrize("max_tokens", [16, 30, 60])
def test_the_character_bound_keeps_what_full_tokenisation_keeps(max_tokens, monkeypatch):
    tokenizer = byte_level_bpe()
    examples = [prompt("What is 12 + 30? " * n + "x" * (n % 5)) for n in range(0, 60, 3)]
    with_bound = encode_prompts(examples, tokenizer, use_chat_template=True, max_prompt_tokens=max_tokens)
    monkeypatch.setattr("posttrain.data.chat.prompt_char_limit", lambda tokenizer, n: 0)
    without = encode_prompts(examples, tokenizer, use_chat_template=True, max_prompt_tokens=max_tokens)
    assert [p.token_ids for p in with_bound] == [p.token_ids for p in without]


def test_no_bound_where_one_token_may_stand_for_any_length():
    # Word-level with an unknown token: a word of any length can be one token.
    assert prompt_char_limit(make_tokenizer(), 32) == 0
    assert prompt_char_limit(byte_level_bpe(), 0) == 0
