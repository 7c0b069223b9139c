"""Preference pairs for DPO: reading (prompt, chosen, rejected) rows and tokenising them.

A row's prompt is a string (one user message) or a chat message list. Chosen and rejected are
each a string (the assistant's reply) or a message list continuing the conversation; a list
that starts with a copy of the prompt's messages (UltraFeedback-binarized style) has that copy
removed, and rows without a prompt column take the messages that chosen and rejected share as
their prompt (an "implicit prompt").

Tokenisation matches what the policy sees when it generates: the prompt is formatted exactly
as :func:`posttrain.data.chat.format_prompt` does (ending with the assistant header), and each
response is the rest of the chat-template rendering of prompt + response, so it ends with the
template's own end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ...). Text the template
writes after that marker (a newline between turns) is dropped: generation stops at the marker.
A response that does not end in a special token (raw text, or a template without one) gets the
tokenizer's EOS appended, so the model learns to stop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.config.dpo_schema import DPODataConfig
from posttrain.data.files import Row, read_rows
from posttrain.data.prompts import _preview, check_roles, split_validation
from posttrain.errors import PosttrainError
from posttrain.data.chat import format_prompt

logger = logging.getLogger("posttrain.data")

Messages = list[dict[str, str]]


@dataclass
class PreferenceExample:
    """One parsed row: the prompt messages and the two continuations (message lists)."""

    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass
class PreferencePair:
    """One tokenised pair. ``ref_*_logps`` are the reference model's summed response logprobs,
    filled in once by the DPO recipe before training (NaN until then)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen_logps: float = math.nan
    ref_rejected_logps: float = math.nan


def _messages(value: Any, where: str, column: str, config_key: str) -> Messages:
    ok = isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise PosttrainError(
            f"{where}: column {column!r} must be a string or a non-empty list of {{\"role\": str, \"content\": str}} "
            f"messages, got {_preview(value)}. Fix the row, or set {config_key} to the right column."
        )
    check_roles(value, where, column)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _continuation(value: Any, prompt: Messages, where: str, column: str, config_key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, where, column, config_key)
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]  # the list repeats the conversation so far
    if not messages:
        raise PosttrainError(f"{where}: column {column!r} holds only the prompt's messages and no response.")
    if messages[-1]["role"] != "assistant":
        raise PosttrainError(
            f"{where}: column {column!r} must end with an assistant message (the response being compared), "
            f"got role {messages[-1]['role']!r}."
        )
    return messages


def rows_to_preference_examples(rows: list[Row], cfg: DPODataConfig, source: str) -> list[PreferenceExample]:
    """Parse raw rows; every problem is a PosttrainError naming the row, the column and the fix."""
    if not rows:
        raise PosttrainError(f"{source}: the dataset is empty. Point the data path at a file with at least one row.")
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        for column, key in [(cfg.chosen_column, "data.chosen_column"), (cfg.rejected_column, "data.rejected_column")]:
            if row.get(column) is None:
                raise PosttrainError(
                    f"{where}: has no {column!r} column; columns found: {sorted(row)}. Set {key} to the column "
                    "holding that response."
                )
        chosen, rejected = row[cfg.chosen_column], row[cfg.rejected_column]
        prompt_value = row.get(cfg.prompt_column)
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": prompt_value}]
        elif prompt_value is not None:
            prompt = _messages(prompt_value, where, cfg.prompt_column, "data.prompt_column")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt = _shared_prefix(_messages(chosen, where, cfg.chosen_column, "data.chosen_column"),
                                    _messages(rejected, where, cfg.rejected_column, "data.rejected_column"))
            if not prompt:
                raise PosttrainError(
                    f"{where}: has no {cfg.prompt_column!r} column and its chosen/rejected conversations share no "
                    "leading messages to use as the prompt. Add a prompt column or set data.prompt_column."
                )
        else:
            raise PosttrainError(
                f"{where}: has no {cfg.prompt_column!r} column; columns found: {sorted(row)}. Set "
                "data.prompt_column to the column holding the prompt (a string or a message list)."
            )
        examples.append(PreferenceExample(
            prompt=prompt,
            chosen=_continuation(chosen, prompt, where, cfg.chosen_column, "data.chosen_column"),
            rejected=_continuation(rejected, prompt, where, cfg.rejected_column, "data.rejected_column"),
        ))
    return examples


def _shared_prefix(a: Messages, b: Messages) -> Messages:
    """The leading messages ``a`` and ``b`` have in common, leaving each at least one response message."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return a[:n]


def load_preference_examples(cfg: DPODataConfig, seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, validation) examples; validation is validation_path or a seeded carve-out."""
    if not cfg.train_path:
        raise PosttrainError("data.train_path is empty: set it to a JSONL/Parquet file of preference pairs "
                             "(prompt, chosen, rejected), a saved `datasets` folder, or hf:NAME.")
    rows = read_rows(cfg.train_path, split=cfg.split, config_key="data.train_path")
    train = rows_to_preference_examples(rows, cfg, cfg.train_path)
    if cfg.validation_path:
        rows = read_rows(cfg.validation_path, split=cfg.split, config_key="data.validation_path")
        return train, rows_to_preference_examples(rows, cfg, cfg.validation_path)
    return split_validation(train, cfg.validation_size, seed)  # type: ignore[arg-type,return-value]


def _end_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of special tokens; a template's end-of-turn marker is one of them."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    return ids


def _with_system(messages: Messages, system_prompt: str) -> Messages:
    # The same rule as format_prompt, so prompt and full renderings start identically.
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _response_text(prompt_text: str, ex: PreferenceExample, continuation: Messages, tokenizer: PreTrainedTokenizerBase,
                   use_chat_template: bool, system_prompt: str, where: str) -> str:
    if not use_chat_template:
        return "\n\n".join(m["content"] for m in continuation)
    full = tokenizer.apply_chat_template(_with_system(ex.prompt, system_prompt) + continuation, tokenize=False)
    if not full.startswith(prompt_text):
        raise PosttrainError(
            f"{where}: the chat template renders the prompt differently with and without the response, so the "
            "response tokens cannot be separated from the prompt. Use a model whose template only appends turns, "
            "or set model.use_chat_template=false and put the formatting into the data."
        )
    return full[len(prompt_text):].rstrip()


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_chat_template: bool,
    system_prompt: str = "",
    max_prompt_tokens: int = 0,
    max_response_tokens: int = 0,
    what: str = "pairs",
) -> list[PreferencePair]:
    """Tokenise examples into pairs, truncating long prompts (keeping their end) and long responses
    (keeping their start) with one warning each; pairs whose responses end up identical are dropped."""
    if tokenizer.eos_token_id is None:
        raise PosttrainError("The tokenizer has no EOS token, so responses cannot be terminated; use a tokenizer with one.")
    prompt_texts = [format_prompt(ex.prompt, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
                    for ex in examples]
    responses = {
        side: [_response_text(p, ex, getattr(ex, side), tokenizer, use_chat_template, system_prompt, f"{what}: pair {i + 1}")
               for i, (p, ex) in enumerate(zip(prompt_texts, examples))]
        for side in ("chosen", "rejected")
    }
    # The chat template already holds any BOS token; adding special tokens again would double it.
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=not use_chat_template)["input_ids"] if examples else []
    end_ids = _end_token_ids(tokenizer)
    counts = {"prompts": 0, "chosen responses": 0, "rejected responses": 0}

    def finish(ids: list[int], kind: str) -> list[int]:
        ids = list(ids)
        if not ids or ids[-1] not in end_ids:
            ids.append(tokenizer.eos_token_id)
        if max_response_tokens and len(ids) > max_response_tokens:
            counts[kind] += 1
            ids = ids[:max_response_tokens]
        return ids

    encoded = {side: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
               for side, texts in responses.items()}
    pairs, identical = [], 0
    for prompt, chosen, rejected in zip(prompt_ids, encoded["chosen"], encoded["rejected"]):
        if max_prompt_tokens and len(prompt) > max_prompt_tokens:
            counts["prompts"] += 1
            prompt = prompt[-max_prompt_tokens:]
        pair = PreferencePair(list(prompt), finish(chosen, "chosen responses"), finish(rejected, "rejected responses"))
        if pair.chosen_ids == pair.rejected_ids:
            identical += 1  # h is 0 whatever the weights: the pair carries no signal
            continue
        pairs.append(pair)
    limits = {"prompts": ("data.max_prompt_tokens", max_prompt_tokens)}
    for kind, count in counts.items():
        if count:
            key, limit = limits.get(kind, ("data.max_response_tokens", max_response_tokens))
            logger.warning("Truncated %d %s of %d %s to %s=%d", count, kind, len(examples), what, key, limit)
    if identical:
        logger.warning("Dropped %d of %d %s whose chosen and rejected responses are identical (after truncation)",
                       identical, len(examples), what)
    if examples and not pairs:
        raise PosttrainError(f"Every one of the {what} has identical chosen and rejected responses; check "
                             "data.chosen_column and data.rejected_column, or raise data.max_response_tokens.")
    return pairs
