"""Server-sent events for the OpenAI-compatible endpoints: whole completions sent as one stream,
and live streams whose text grows as posttrain's engine produces tokens."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from posttrain.sampling import stop_window
from posttrain.server.engine_loop import TokenStream, TokenUpdate


def cut_at_stops(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


class StreamedChoice:
    """One choice of a live stream: its tokens so far and how much of them was sent. Text is
    decoded from all tokens each time (a token may end inside a UTF-8 character: a trailing U+FFFD
    waits for the next token); with stop strings the last ``stop_window`` tokens wait until the
    choice ends, since the engine may still cut them."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = stop_window(stops) if stops else 0
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.text = ""  # sent so far
        self.num_reported = 0  # tokens whose logprobs were sent

    def apply(self, update: TokenUpdate) -> None:
        del self.token_ids[update.start:], self.logprobs[update.start:]
        self.token_ids += update.token_ids
        self.logprobs += update.logprobs
        self.finish_reason = update.finish_reason

    def delta(self) -> tuple[str, list[tuple[int, float]]]:
        """New text, and the new (token id, logprob) pairs to report, since the last call."""
        done = self.finish_reason is not None
        ready = len(self.token_ids) if done else max(len(self.token_ids) - self.hold, 0)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = cut_at_stops(text, self.stops)
        # A stop string in the visible text ends the choice's text as in the non-streamed answer, even
        # before the engine (which matches text with special tokens) stops the sequence.
        if not done and len(cut) == len(text):
            if ready < len(self.token_ids):
                text = self.tokenizer.decode(self.token_ids[:ready], skip_special_tokens=True)
            text = text.rstrip("\ufffd")
        else:
            text = cut
        new = text[len(self.text):]
        self.text += new
        tokens = [(t, lp) for t, lp in zip(self.token_ids[self.num_reported:ready], self.logprobs[self.num_reported:ready])
                  if t not in self.special]
        self.num_reported = max(self.num_reported, ready)
        return new, tokens


async def live_chunks(stream: TokenStream, choices: list[StreamedChoice],
                       on_delta: Callable[[int, StreamedChoice, str, list[tuple[int, float]]], list[dict[str, Any]]],
                       ) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a live stream, from ``on_delta(index, choice, new_text, new_tokens)`` per update."""
    async for updates in stream:
        for update in updates:
            choice = choices[update.index]
            choice.apply(update)
            for chunk in on_delta(update.index, choice, *choice.delta()):
                yield chunk


def sse_response(events: list[dict[str, Any]]) -> StreamingResponse:
    async def stream():
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
