"""What ends a completion, shared by every engine: the EOS token ids, and stop strings (where a
completion's text first contains one).

Stop strings are matched in the generated text only (as in the OpenAI API), never in text that
straddles the prompt."""

from __future__ import annotations

from typing import Any, Sequence


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokenizer's EOS plus every EOS of the model's generation config (chat models often add
    an end-of-turn token there)."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(ids)


def stop_window(stops: Sequence[str]) -> int:
    """Tokens at the end of a completion that cover any stop string: every token decodes to at
    least one character."""
    return max(len(s) for s in stops) + 1


def tail_has_stop(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> bool:
    """Cheap per-step check: does the decoded tail of ``tokens`` contain a stop string?"""
    text = tokenizer.decode(tokens[-stop_window(stops):])
    return any(s in text for s in stops)


def stop_string_end(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> int | None:
    """Length of the shortest prefix of ``tokens`` whose text contains a stop string, or None."""
    text = tokenizer.decode(tokens)
    if not any(s in text for s in stops):
        return None
    # Rare enough (once per stopped completion) that a linear scan is fine.
    for k in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:k]) for s in stops):
            return k
    return None
