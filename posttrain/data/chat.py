"""Turning chat messages into prompt token ids."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from posttrain.data.stream import LazySequence
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.data")


@dataclass
class TokenizedPrompt:
    token_ids: list[int]
    messages: list[dict[str, Any]]
    metadata: dict[str, Any]


def format_prompt(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool, system_prompt: str = ""
) -> str:
    """The prompt text the model sees, ending where the assistant's answer starts."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not use_chat_template:
        return "\n\n".join(m["content"] for m in messages)
    if not getattr(tokenizer, "chat_template", None):
        raise PosttrainError(
            "The tokenizer has no chat template; set model.use_chat_template=false to feed raw prompt "
            "text, or use an instruct model."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    examples: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_chat_template: bool,
    system_prompt: str = "",
    max_prompt_tokens: int = 0,
    what: str = "prompts",
) -> list[TokenizedPrompt]:
    """Tokenize ``PromptExample``s (objects with ``messages`` and ``metadata``).

    Prompts longer than ``max_prompt_tokens`` are dropped with one warning; dropping all of them
    is an error, since training could not start. A prompt whose text alone is too long for
    ``max_prompt_tokens`` tokens (see ``prompt_char_limit``) is dropped before it is templated or
    tokenised: a multi-megabyte row would otherwise cost gigabytes and a minute of tokenising."""
    if isinstance(examples, LazySequence):
        return _encode_streaming(examples, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt,
                                 max_prompt_tokens=max_prompt_tokens, what=what)
    char_limit = prompt_char_limit(tokenizer, max_prompt_tokens)
    kept = [ex for ex in examples if not char_limit or _content_chars(ex.messages) <= char_limit]
    texts = [
        format_prompt(ex.messages, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
        for ex in kept
    ]
    if char_limit:
        kept, texts = [ex for ex, t in zip(kept, texts) if len(t) <= char_limit], [t for t in texts if len(t) <= char_limit]
    cut_early = len(examples) - len(kept)
    # The chat template already holds any BOS token; adding special tokens again would double it.
    add_special = not use_chat_template
    ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []
    prompts = [
        TokenizedPrompt(token_ids=list(t), messages=list(ex.messages), metadata=dict(ex.metadata))
        for t, ex in zip(ids, kept)
        if not max_prompt_tokens or len(t) <= max_prompt_tokens
    ]
    _report_dropped(len(examples), len(prompts), cut_early, char_limit, max_prompt_tokens, what)
    return prompts


def _report_dropped(total: int, kept: int, cut_early: int, char_limit: int, max_prompt_tokens: int, what: str) -> None:
    dropped = total - kept
    if dropped:
        logger.warning("Dropped %d of %d %s longer than data.max_prompt_tokens=%d%s", dropped, total, what,
                       max_prompt_tokens, f" ({cut_early} of them over {char_limit:,} characters, before tokenising)"
                       if cut_early else "")
    if total and not kept:
        raise PosttrainError(f"Every one of the {what} is longer than data.max_prompt_tokens={max_prompt_tokens}; raise it.")


class TokenizedPrompts(LazySequence):
    """``encode_prompts`` of a lazy sequence of examples (data/stream.py): the token ids of the
    prompts kept, in one int32 array (4 bytes a token), and their positions in ``examples``; the
    messages and metadata of a prompt are made again from ``examples`` when it is asked for."""

    def __init__(self, examples: LazySequence, kept: np.ndarray, bounds: np.ndarray, ids: np.ndarray) -> None:
        self.examples = examples
        self.kept = kept  # position in examples of each prompt kept
        self.bounds = bounds  # prompt i's ids: ids[bounds[i]:bounds[i + 1]]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.kept)

    def _make(self, i: int, ex: Any) -> TokenizedPrompt:
        ids = self.ids[self.bounds[i]:self.bounds[i + 1]].tolist()
        return TokenizedPrompt(token_ids=ids, messages=list(ex.messages), metadata=dict(ex.metadata))

    def _item(self, i: int) -> TokenizedPrompt:
        return self._make(i, self.examples[int(self.kept[i])])

    def __iter__(self) -> Iterator[TokenizedPrompt]:
        for i, ex in enumerate(self.examples.iter_at(self.kept)):
            yield self._make(i, ex)


# Examples templated and tokenised at once by the streaming encoder: big enough for the fast
# tokenizer's batching to pay, small enough that the texts and the tokenizer's output stay small.
ENCODE_CHUNK = 1024


def _encode_streaming(examples: LazySequence, tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool,
                      system_prompt: str, max_prompt_tokens: int, what: str) -> TokenizedPrompts:
    """``encode_prompts`` in one pass over ``examples``, ENCODE_CHUNK at a time: the same prompts
    kept, the same token ids and warnings, but only the ids are held (see TokenizedPrompts)."""
    char_limit = prompt_char_limit(tokenizer, max_prompt_tokens)
    add_special = not use_chat_template
    kept, lengths, ids = array("q"), array("q"), array("i")
    total = cut_early = 0
    chunk: list[tuple[int, str]] = []

    def flush() -> None:
        if not chunk:
            return
        encoded = tokenizer([t for _, t in chunk], add_special_tokens=add_special)["input_ids"]
        for (i, _), t in zip(chunk, encoded):
            if not max_prompt_tokens or len(t) <= max_prompt_tokens:
                kept.append(i)
                lengths.append(len(t))
                ids.extend(t)
        chunk.clear()

    for i, ex in enumerate(examples):
        total += 1
        if char_limit and _content_chars(ex.messages) > char_limit:
            cut_early += 1
            continue
        text = format_prompt(ex.messages, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
        if char_limit and len(text) > char_limit:
            cut_early += 1
            continue
        chunk.append((i, text))
        if len(chunk) >= ENCODE_CHUNK:
            flush()
    flush()
    _report_dropped(total, len(kept), cut_early, char_limit, max_prompt_tokens, what)
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=bounds[1:])
    # Views of the arrays (no copy: they are not resized again, and the views keep them alive).
    return TokenizedPrompts(examples, np.frombuffer(kept, dtype=np.int64), bounds, np.frombuffer(ids, dtype=np.int32))


# Characters per token assumed at most beyond the longest vocabulary entry: normalisation (NFC)
# can merge up to about 3 characters into one, so the bound keeps a margin for it.
_NORMALISATION_MARGIN = 4


def prompt_char_limit(tokenizer: Any, max_prompt_tokens: int) -> int:
    """A length in characters above which a prompt surely has more than ``max_prompt_tokens``
    tokens, so it can be dropped without tokenising it; 0 when no such bound is known.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and BPE with byte fallback (Llama 2, Mistral)
    turn every character into at least one byte of some token, and one token spells at most as
    many characters as its longest vocabulary entry, so a text of more characters than
    max_prompt_tokens x that length (x a margin for normalisation) has more tokens than allowed.
    Other tokenizers (word-level, WordPiece, Unigram without byte fallback) may map an arbitrarily
    long word to one unknown token: no bound."""
    if not max_prompt_tokens:
        return 0
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ != "BPE":
        return 0
    byte_level = "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)
    if not (byte_level or getattr(model, "byte_fallback", False)):
        return 0
    longest = max(map(len, tokenizer.get_vocab()), default=0)
    return max_prompt_tokens * max(longest, 1) * _NORMALISATION_MARGIN


def _content_chars(messages: Sequence[dict[str, Any]]) -> int:
    """Characters of the messages' text (the chat template only adds to it)."""
    return sum(len(m.get("content")) for m in messages if isinstance(m.get("content"), str))
