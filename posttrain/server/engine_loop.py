"""Continuous batching across HTTP requests: one thread owns posttrain's ``Engine`` and steps it.

Request handlers ``await loop.generate(prompts, params)``. The loop thread adds queued requests
to the engine between two steps, so a request that arrives while others decode joins their batch
at the next step instead of waiting for them to finish, and it resolves each request's future
(through the request's event loop, ``call_soon_threadsafe``) once all its sequences are finished.

Everything else that touches the engine (weight updates, cache flushes, checksums) runs on the
same thread between steps, through ``call``; ``pause`` stops stepping until ``resume`` (calls
still run). A step that raises fails every request in the engine (their sequences were in the
failed batch or wait behind it in an engine whose state is now suspect: they are aborted and the
prefix cache is dropped); the loop then serves the next requests.

A streaming request (``open_stream``) also gets, after every step, the tokens its sequences
produced in it (``TokenUpdate``s, through an ``asyncio.Queue``), so the server can send them while
the others decode. Closing the stream cancels the request; the loop aborts its sequences. A
stream given a ``deadline`` raises ``TimeoutError`` once it passes, so a paused or stuck engine
never holds a client forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch

from posttrain.sampling import Completion, SamplingParams

if TYPE_CHECKING:
    from posttrain.engine import Engine
    from posttrain.engine.sequence import Sequence

logger = logging.getLogger("posttrain.server")
T = TypeVar("T")


class EngineLoopStopped(RuntimeError):
    """The loop was stopped (server shutdown) before the request or call ran."""


class EngineLoopTimeout(TimeoutError):
    """A ``call`` or ``pause`` waited longer than its timeout for the loop thread (a step that does
    not end, or a call that does not return)."""


# Waits on the loop thread from other threads end after this long unless told otherwise: long
# enough for a weight update of a large model, short enough that a stuck engine surfaces.
DEFAULT_WAIT_TIMEOUT_S = 600.0


class GenerationPaused(RuntimeError):
    """The request waited ``paused_wait_s`` while the loop was paused and was not admitted."""


@dataclass
class TokenUpdate:
    """Sequence ``index`` (``prompt * n + j``) now holds ``token_ids`` from completion position
    ``start`` on. ``start`` can be below what was sent before: a stop string cuts the tail when the
    sequence finishes (``finish_reason`` set), and the update then carries the cut completion."""

    index: int
    start: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Optional[str] = None


@dataclass
class _Request:
    prompts: list[list[int]]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    groups: list[list[Sequence]] = field(default_factory=list)  # one group of n sequences per prompt
    updates: asyncio.Queue | None = None  # streaming requests only: lists of TokenUpdate, then None or an error
    sent: list[int] = field(default_factory=list)  # per sequence: completion tokens pushed; -1 once finished
    admit_by: float | None = None  # time.monotonic(): while paused, not admitted by then -> GenerationPaused

    @property
    def sequences(self) -> list[Sequence]:
        return [s for group in self.groups for s in group]

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """From the loop thread: settle the future on its event loop."""

        def settle() -> None:
            if self.future.done():  # cancelled: the client went away
                return
            if self.updates is not None:  # the stream's reader gets the error (None: the stream is complete)
                self.updates.put_nowait(error)
                self.future.set_result(None)
            elif error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    def push_updates(self) -> None:
        """From the loop thread: hand the streaming client what its sequences produced since the last push."""
        updates = []
        for index, seq in enumerate(self.sequences):
            sent = self.sent[index]
            if sent < 0:
                continue
            tokens = seq.completion_token_ids
            if seq.is_finished:
                start = min(sent, len(tokens))
                updates.append(TokenUpdate(index, start, tokens[start:], list(seq.logprobs[start:]), seq.finish_reason))
                self.sent[index] = -1
            elif len(tokens) > sent:
                updates.append(TokenUpdate(index, sent, tokens[sent:], list(seq.logprobs[sent:])))
                self.sent[index] = len(tokens)
        if updates:
            self._put(updates)

    def _put(self, item: Any) -> None:
        def put() -> None:
            if not self.future.done():
                self.updates.put_nowait(item)

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:
            pass


class TokenStream:
    """A streaming request's tokens as the engine produces them: iterate for lists of
    ``TokenUpdate`` (an engine error is raised there); ``close`` cancels the request."""

    def __init__(self, request: _Request, deadline: float | None = None) -> None:
        self._request = request
        self.deadline = deadline  # time.monotonic() after which the stream raises TimeoutError

    async def started(self) -> None:
        """Wait until the loop admitted the request; raises what the engine refused it with."""
        await self.__anext__()  # the loop's first item: an empty list once admitted, or the error

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[TokenUpdate]:
        if self.deadline is None:
            item = await self._request.updates.get()
        else:
            item = await asyncio.wait_for(self._request.updates.get(), max(0.0, self.deadline - time.monotonic()))
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """The client went away (or the stream ended): the loop aborts what is still running."""
        if not self._request.future.done():
            self._request.future.cancel()


class EngineLoop:
    def __init__(self, engine: Engine, *, name: str = "posttrain-engine-loop",
                 wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
        if not wait_timeout_s > 0:
            raise ValueError(f"wait_timeout_s must be > 0, got {wait_timeout_s}")
        self.engine = engine
        self.wait_timeout_s = wait_timeout_s  # the default of call() and pause()
        self._cond = threading.Condition()
        self._submitted: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._in_engine: list[_Request] = []  # only the loop thread touches these
        self._paused = False
        self._busy = False  # the loop thread is adding requests or stepping
        self._stopped = False
        self.num_generated_tokens = 0  # completion tokens of every request that ended, for /metrics
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_requests_in_engine(self) -> int:
        """Requests added to the engine and not yet answered (read from any thread: a snapshot)."""
        return len(self._in_engine)

    def num_sequences(self) -> tuple[int, int]:
        """(running, waiting) sequences in the engine's scheduler (a snapshot, from any thread)."""
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is None:
            return 0, 0
        return len(scheduler.running), len(scheduler.waiting)

    # -- from other threads ----------------------------------------------------------------------

    async def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                       paused_wait_s: float | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt, generated in the engine's running batch. A request
        that waits more than ``paused_wait_s`` while the loop is paused fails with ``GenerationPaused``
        (requests that arrive during a pause stay queued, so that they are batched together on resume)."""
        loop = asyncio.get_running_loop()
        request = _Request(prompts, params, loop, loop.create_future(), admit_by=_admit_by(paused_wait_s))
        with self._cond:
            if self._stopped:
                raise EngineLoopStopped("the engine loop has stopped")
            self._submitted.append(request)
            self._cond.notify_all()
        return await request.future

    def open_stream(self, prompts: list[list[int]], params: SamplingParams, *,
                    deadline: float | None = None, paused_wait_s: float | None = None) -> TokenStream:
        """Like ``generate``, but the tokens come as they are produced (call from an event loop);
        reading the stream past ``deadline`` (``time.monotonic()``) raises ``TimeoutError``."""
        loop = asyncio.get_running_loop()
        request = _Request(prompts, params, loop, loop.create_future(), updates=asyncio.Queue(),
                           admit_by=_admit_by(paused_wait_s))
        with self._cond:
            if self._stopped:
                raise EngineLoopStopped("the engine loop has stopped")
            self._submitted.append(request)
            self._cond.notify_all()
        return TokenStream(request, deadline)

    def call(self, fn: Callable[[], T], *, what: str | None = None, timeout_s: float | None = None) -> T:
        """Run ``fn`` on the loop thread between two steps (also while paused); blocks until done,
        at most ``timeout_s`` (default ``wait_timeout_s``), then raises ``EngineLoopTimeout`` naming
        ``what``. A call that times out before it started is dropped; one already running finishes
        on the loop thread (its result is discarded)."""
        if threading.current_thread() is self._thread:
            return fn()
        timeout_s = self.wait_timeout_s if timeout_s is None else timeout_s
        what = what or getattr(fn, "__name__", "a call")
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopped:
                raise EngineLoopStopped("the engine loop has stopped")
            self._calls.append((fn, done))
            self._cond.notify_all()
        try:
            return done.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            started = not done.cancel()  # a call still queued is dropped; a running one cannot be
            state = "is still running" if started else "never started: the loop thread was busy in an engine step"
            raise EngineLoopTimeout(f"{what} on the engine loop did not finish within {timeout_s:g} s ({state}).") from None

    def pause(self, timeout_s: float | None = None) -> None:
        """Stop stepping; returns once the running step has finished. If it does not finish within
        ``timeout_s`` (default ``wait_timeout_s``), stepping resumes and ``EngineLoopTimeout`` says so."""
        timeout_s = self.wait_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: not self._busy, timeout=timeout_s):
                self._paused = False  # not paused after all: the caller gets an error, generation goes on
                self._cond.notify_all()
                raise EngineLoopTimeout(f"pausing the engine loop: its running step did not finish within {timeout_s:g} s.")

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the running step, fail what is left and end the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- the loop thread -------------------------------------------------------------------------

    def _has_work(self) -> bool:
        if self._calls:
            return True
        return not self._paused and bool(self._submitted or self.engine.has_unfinished)

    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # per thread; NCCL weight groups are joined here too
        while True:
            with self._cond:
                while not self._stopped and not self._has_work():
                    self._cond.wait(self._expire_paused())
                if self._stopped:
                    break
                calls = list(self._calls)
                self._calls.clear()
                stepping = not self._paused
                submitted = []
                if stepping:
                    submitted = list(self._submitted)
                    self._submitted.clear()
                self._busy = stepping
            try:
                for fn, done in calls:
                    if not done.set_running_or_notify_cancel():  # its caller timed out and dropped it
                        continue
                    try:
                        done.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        done.set_exception(exc)
                if stepping:
                    for request in submitted:
                        self._admit(request)
                    self._step()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        self._shut_down()

    def _expire_paused(self) -> float | None:
        """(Under the lock, while nothing runs) fail queued requests whose pause wait is over;
        returns the seconds until the next one is due (None: no deadline)."""
        if not self._paused:
            return None
        now = time.monotonic()
        kept: deque[_Request] = deque()
        for request in self._submitted:
            if request.admit_by is not None and now >= request.admit_by:
                request.resolve(error=GenerationPaused("generation stayed paused"))
            else:
                kept.append(request)
        self._submitted = kept
        due = [r.admit_by - now for r in kept if r.admit_by is not None]
        return max(0.01, min(due)) if due else None

    def _admit(self, request: _Request) -> None:
        if request.future.cancelled():
            return
        try:
            for prompt in request.prompts:
                request.groups.append(self.engine.add_request(prompt, request.params))
        except Exception as exc:  # e.g. a prompt longer than max_model_len: only this request fails
            self.engine.abort(request.sequences)
            request.resolve(error=exc)
            return
        self._in_engine.append(request)
        if request.updates is not None:
            request.sent = [0] * len(request.sequences)
            request._put([])  # admitted

    def _step(self) -> None:
        try:
            finished = self.engine.step() if self.engine.has_unfinished else []
        except Exception as exc:
            logger.exception("engine step failed: failing the %d requests in the engine", len(self._in_engine))
            self.engine.abort([s for r in self._in_engine for s in r.sequences])
            self.engine.flush_cache()  # the failed step may have registered blocks it never wrote
            for request in self._in_engine:
                request.resolve(error=exc)
            self._in_engine = []
            return
        for request in self._in_engine:
            if request.updates is not None and not request.future.cancelled():
                request.push_updates()
        gone = [r for r in self._in_engine if r.future.cancelled()]
        if gone:  # their clients went away (or timed out): free the slots and blocks
            self.engine.abort([s for r in gone for s in r.sequences])
            self.num_generated_tokens += sum(len(s.completion_token_ids) for r in gone for s in r.sequences)
        if not (finished or gone or not self.engine.has_unfinished):
            return
        waiting = []
        for request in self._in_engine:
            if request.future.cancelled():
                continue
            if not all(s.is_finished for s in request.sequences):
                waiting.append(request)
                continue
            self.num_generated_tokens += sum(len(s.completion_token_ids) for s in request.sequences)
            try:
                request.resolve([[self.engine.completion(s) for s in group] for group in request.groups])
            except Exception as exc:
                request.resolve(error=exc)
        self._in_engine = waiting

    def _shut_down(self) -> None:
        error = EngineLoopStopped("the server is shutting down")
        for request in self._in_engine + list(self._submitted):
            request.resolve(error=error)
        self.engine.abort([s for r in self._in_engine for s in r.sequences])
        self._in_engine = []
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
            self._submitted.clear()
        for _, done in calls:
            if done.set_running_or_notify_cancel():
                done.set_exception(error)


def _admit_by(paused_wait_s: float | None) -> float | None:
    return None if paused_wait_s is None else time.monotonic() + paused_wait_s
