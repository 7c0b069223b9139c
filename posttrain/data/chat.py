"""Turning chat messages into prompt token ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

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
    is an error, since training could not start."""
    texts = [
        format_prompt(ex.messages, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
        for ex in examples
    ]
    # The chat template already holds any BOS token; adding special tokens again would double it.
    add_special = not use_chat_template
    ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    prompts = [
        TokenizedPrompt(token_ids=list(t), messages=list(ex.messages), metadata=dict(ex.metadata))
        for t, ex in zip(ids, examples)
        if not max_prompt_tokens or len(t) <= max_prompt_tokens
    ]
    dropped = len(examples) - len(prompts)
    if dropped:
        logger.warning("Dropped %d of %d %s longer than data.max_prompt_tokens=%d", dropped, len(examples), what, max_prompt_tokens)
    if examples and not prompts:
        raise PosttrainError(f"Every one of the {what} is longer than data.max_prompt_tokens={max_prompt_tokens}; raise it.")
    return prompts
