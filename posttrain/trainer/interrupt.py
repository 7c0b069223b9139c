"""Ctrl-C and SIGTERM handling that never leaves a half-applied optimizer step behind."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from posttrain.errors import Terminated

# SIGTERM is what schedulers send before they kill (Slurm preemption, Kubernetes eviction, docker
# stop): handled like Ctrl-C, so a preempted run leaves a checkpoint of its last whole step.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    """Ctrl-C raises KeyboardInterrupt as usual (SIGTERM: Terminated, a KeyboardInterrupt),
    except inside ``deferred()``: there the request is remembered and raised when the block ends.
    The training loop wraps the weight update in ``deferred()`` so a checkpoint saved after an
    interrupt always holds whole steps.

    ``defer_always`` (multi-process runs): a signal never raises; the request is only recorded in
    ``pending``, and the ranks agree at a step boundary to stop together (a rank that stopped alone
    would leave the others waiting in a collective); they then raise ``interrupt()``.

    After the first SIGTERM, SIGTERM has its default action again: a second one ends the process at
    once (the last checkpoint on disk stays whole: checkpoints are committed by renames)."""

    def __init__(self, defer_always: bool = False) -> None:
        self.defer_always = defer_always
        self._deferring = False
        self._pending = False
        self._terminated = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            if sig == signal.SIGTERM and self._terminated:
                continue  # stays SIG_DFL: a second SIGTERM while the run winds down ends it at once
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            self._terminated = True
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._deferring or self.defer_always:
            if not self._pending:
                # Say why nothing happens yet: an update can take seconds. os.write, not print:
                # a handler that prints while the main thread is printing gets a reentrant-call error.
                name = b"SIGTERM" if signum == signal.SIGTERM else b"Ctrl-C"
                with contextlib.suppress(OSError):
                    os.write(2, b"\n" + name + b": finishing the weight update in progress, then stopping.\n")
            self._pending = True
            return
        raise self.interrupt()

    def interrupt(self) -> KeyboardInterrupt:
        """The exception that stops the run: Terminated after a SIGTERM, else KeyboardInterrupt."""
        return Terminated() if self._terminated else KeyboardInterrupt()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending and not self.defer_always:
            self._pending = False
            raise self.interrupt()

    @property
    def pending(self) -> bool:
        """Whether Ctrl-C or SIGTERM came and was not yet acted on."""
        return self._pending
