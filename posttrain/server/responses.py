"""Pieces of OpenAI-format responses: per-token logprobs of chat and text completions, and usage."""

from __future__ import annotations

from typing import Any


def chat_logprobs(tokenizer: Any, tokens: list[tuple[int, float]]) -> dict[str, Any]:
    content = []
    for token_id, lp in tokens:
        token = tokenizer.decode([token_id])
        content.append({"token": token, "logprob": lp, "bytes": list(token.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def completion_logprobs(tokenizer: Any, tokens: list[tuple[int, float]], offset: int = 0) -> dict[str, Any]:
    """Text offsets start at ``offset``: where these tokens' text begins in the completion."""
    texts, token_logprobs, offsets = [], [], []
    for token_id, lp in tokens:
        token = tokenizer.decode([token_id])
        texts.append(token)
        token_logprobs.append(lp)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": None, "text_offset": offsets}


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
