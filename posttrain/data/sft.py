"""SFT data: rows of conversations -> token ids plus a mask of the tokens the loss covers.

Two row formats (columns named by ``data.*_column``):

* ``messages``: a chat list ``[{"role", "content"}, ...]``. The loss covers every assistant turn:
  its content and the end-of-turn token the chat template writes after it (``<|im_end|>``), so
  the model learns to stop. System and user turns, and the template's headers, are masked.
* ``prompt`` + ``completion`` strings: the loss covers the completion only. With
  ``model.use_chat_template`` the pair is one user turn and one assistant turn; without it the
  text is ``prompt + completion`` verbatim (put any separator in the prompt) followed by EOS.

Where an assistant turn starts and ends is found from token prefixes, not by searching strings:
the conversation up to turn k is rendered (with the generation prompt, i.e. the assistant
header) and tokenized, and its length is where turn k's tokens start in the full conversation;
the rendering through turn k gives where they end. Trailing whitespace-only tokens the template
adds after the end-of-turn token (ChatML's newline) are not trained on. A template that rewrites
earlier turns once later ones are added (so the prefixes do not match) is reported as an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from transformers import PreTrainedTokenizerBase

from posttrain.config.schema import ModelConfig
from posttrain.config.sft_schema import SFTDataConfig
from posttrain.data.files import Row, read_rows
from posttrain.data.prompts import _parse_messages, _preview, split_validation
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.data")

Messages = list[dict[str, str]]


@dataclass
class SFTExample:
    """One tokenized conversation. ``loss_mask[i]`` is 1 when token ``i`` is a training target
    (predicted from the tokens before it); ``loss_mask[0]`` is always 0."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Conversation:
    """A parsed row: its messages, and whether it came from prompt/completion columns (which
    changes only how raw text is joined when the chat template is off)."""

    messages: Messages
    from_prompt_completion: bool = False


def parse_rows(rows: list[Row], cfg: SFTDataConfig, source: str) -> list[Conversation]:
    """Check every row and turn it into a Conversation; errors name the row, the column and the fix."""
    if not rows:
        raise PosttrainError(f"{source}: the dataset is empty. Point the data path at a file with at least one row.")
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        if row.get(cfg.messages_column) is not None:
            messages = _parse_messages(row[cfg.messages_column], where, cfg.messages_column)
            if not any(m["role"] == "assistant" for m in messages):
                raise PosttrainError(
                    f"{where}: column {cfg.messages_column!r} has no assistant message (roles: "
                    f"{[m['role'] for m in messages]}), so there is nothing to learn. Add the assistant's "
                    "answer to the row or drop it."
                )
            out.append(Conversation(messages))
        elif row.get(cfg.prompt_column) is not None or row.get(cfg.completion_column) is not None:
            for column in (cfg.prompt_column, cfg.completion_column):
                if not isinstance(row.get(column), str):
                    raise PosttrainError(
                        f"{where}: column {column!r} must be a string, got {_preview(row.get(column))}. "
                        f"Prompt/completion rows need both {cfg.prompt_column!r} and {cfg.completion_column!r} "
                        f"as text; use data.messages_column for chat lists."
                    )
            messages = [{"role": "user", "content": row[cfg.prompt_column]},
                        {"role": "assistant", "content": row[cfg.completion_column]}]
            out.append(Conversation(messages, from_prompt_completion=True))
        else:
            raise PosttrainError(
                f"{where}: has neither a {cfg.messages_column!r} column nor {cfg.prompt_column!r} and "
                f"{cfg.completion_column!r} columns; columns found: {sorted(row)}. Set data.messages_column "
                "(a chat message list) or data.prompt_column and data.completion_column (texts)."
            )
    return out


def load_sft_conversations(cfg: SFTDataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations; validation is data.validation_path or a seeded carve-out."""
    if not cfg.train_path:
        raise PosttrainError("data.train_path is empty: set it to a JSONL or Parquet file, a saved `datasets` "
                             "folder, or hf:NAME.")
    train = parse_rows(read_rows(cfg.train_path, split=cfg.split), cfg, cfg.train_path)
    if cfg.validation_path:
        rows = read_rows(cfg.validation_path, split=cfg.split, config_key="data.validation_path")
        return train, parse_rows(rows, cfg, cfg.validation_path)
    return split_validation(train, cfg.validation_size, seed)  # type: ignore[arg-type, return-value]


def _renderer(conv: Conversation, tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig
              ) -> tuple[Messages, Callable[[Messages, bool], str]]:
    """The messages (system prompt added) and ``render(messages, add_generation_prompt) -> text``."""
    messages = conv.messages
    system = model_cfg.system_prompt
    if model_cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise PosttrainError("The tokenizer has no chat template; set model.use_chat_template=false to "
                                 "train on raw text, or use a tokenizer/model that has one.")
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]

        def render(msgs: Messages, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

        return messages, render
    # Raw text: prompt/completion rows are concatenated verbatim (the prompt carries any separator,
    # as GRPO's raw prompts do); chat lists are joined by blank lines like data.chat.format_prompt.
    sep = "" if conv.from_prompt_completion else "\n\n"
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system + ("\n\n" if conv.from_prompt_completion else "")},
                    *messages]

    def render_raw(msgs: Messages, generation_prompt: bool) -> str:
        text = sep.join(m["content"] for m in msgs)
        return text + sep if generation_prompt and msgs else text

    return messages, render_raw


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def tokenize_conversation(conv: Conversation, tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig,
                          where: str = "conversation") -> SFTExample:
    """Token ids and loss mask of one conversation (not truncated); see the module docstring."""
    messages, render = _renderer(conv, tokenizer, model_cfg)
    chat = model_cfg.use_chat_template
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        texts = [render(messages, False)]
        for k in turns:
            texts += [render(messages[:k], True), render(messages[: k + 1], False)]
    except Exception as exc:  # jinja templates raise anything (TemplateError, ValueError, ...)
        raise PosttrainError(f"{where}: the chat template cannot render this conversation ({type(exc).__name__}: "
                             f"{exc}). Fix the row's roles/order for this model's template.") from None
    # The template holds any BOS token; raw text gets the tokenizer's usual special tokens.
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    ids = list(encoded[0])
    mask = [0] * len(ids)
    for j, k in enumerate(turns):
        before, through = encoded[1 + 2 * j], encoded[2 + 2 * j]
        end = _common_prefix_len(ids, through)
        if end < len(through):
            raise PosttrainError(
                f"{where}: the chat template renders the conversation up to assistant turn {k + 1} differently "
                "from the same turns inside the whole conversation (it rewrites earlier turns), so the "
                "assistant tokens cannot be located. Split such conversations into one row per assistant "
                "turn, or use prompt/completion rows."
            )
        # A token merged across the header/content boundary counts as content (trained).
        start = _common_prefix_len(ids, before)
        if chat:
            # Keep the end-of-turn token, drop the template's trailing newline(s) after it.
            while end > start and not tokenizer.decode([ids[end - 1]]).strip():
                end -= 1
        for i in range(start, end):
            mask[i] = 1
    if not chat and messages[-1]["role"] == "assistant" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # raw text has no end-of-turn token: teach the model to stop
        mask.append(1)
    if mask:
        mask[0] = 0  # the first token is never predicted
    return SFTExample(ids, mask)


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters of the vocabulary's longest token (byte-level vocabularies: bytes, which bound characters)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def cut_conversation(conv: Conversation, max_chars: int) -> Conversation:
    """``conv`` with its message contents cut after ``max_chars`` characters in all (later messages
    dropped); unchanged when it is shorter."""
    if sum(len(m["content"]) for m in conv.messages) <= max_chars:
        return conv
    messages, left = [], max_chars
    for m in conv.messages:
        if left <= 0:
            break
        messages.append({"role": m["role"], "content": m["content"][:left]})
        left -= len(m["content"])
    return Conversation(messages, conv.from_prompt_completion)


def tokenize_conversations(convs: list[Conversation], tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig,
                           max_seq_len: int, what: str = "training conversations") -> list[SFTExample]:
    """Tokenize and cut to ``max_seq_len`` tokens. Conversations left with no loss token after
    cutting (e.g. a prompt longer than max_seq_len) are dropped; both are counted in one warning."""
    examples, truncated, dropped = [], 0, 0
    # Text this long surely has more than max_seq_len tokens (no token spans more characters than the
    # vocabulary's longest), so it is cut before tokenising: a row of megabytes would otherwise take
    # minutes and gigabytes to tokenise only to be cut to max_seq_len tokens afterwards.
    max_chars = max_seq_len * longest_token_chars(tokenizer) + 1024
    for i, conv in enumerate(convs):
        conv = cut_conversation(conv, max_chars)
        ex = tokenize_conversation(conv, tokenizer, model_cfg, where=f"{what}: row {i + 1}")
        if len(ex) > max_seq_len:
            truncated += 1
            ex = SFTExample(ex.input_ids[:max_seq_len], ex.loss_mask[:max_seq_len])
        if ex.num_loss_tokens == 0:
            dropped += 1
            continue
        examples.append(ex)
    if truncated:
        logger.warning("%d of %d %s were longer than data.max_seq_len=%d tokens and were cut at the end; "
                       "%d of them kept no answer token and were dropped. Raise data.max_seq_len to keep them whole.",
                       truncated, len(convs), what, max_seq_len, dropped)
    elif dropped:
        logger.warning("Dropped %d of %d %s with no answer token (empty assistant content?).", dropped, len(convs), what)
    if convs and not examples:
        raise PosttrainError(f"None of the {what} has a token to train on after cutting to data.max_seq_len="
                             f"{max_seq_len}; raise data.max_seq_len or check that the answers are not empty.")
    return examples
