"""Ctrl-C handling that never leaves a half-applied optimizer step behind."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


class InterruptGuard:
    """Ctrl-C raises KeyboardInterrupt as usual, except inside ``deferred()``: there the request
    is remembered and raised when the block ends. The training loop wraps the weight update in
    ``deferred()`` so a checkpoint saved after an interrupt always holds whole steps.

    ``defer_always`` (multi-process runs): Ctrl-C never raises; the request is only recorded in
    ``pending``, and the ranks agree at a step boundary to stop together (a rank that stopped alone
    would leave the others waiting in a collective)."""

    def __init__(self, defer_always: bool = False) -> None:
        self.defer_always = defer_always
        self._deferring = False
        self._pending = False
        self._previous = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self._deferring or self.defer_always:
            if not self._pending:
                # Say why nothing happens yet: an update can take seconds. os.write, not print:
                # a handler that prints while the main thread is printing gets a reentrant-call error.
                with contextlib.suppress(OSError):
                    os.write(2, b"\nCtrl-C: finishing the weight update in progress, then stopping.\n")
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending and not self.defer_always:
            self._pending = False
            raise KeyboardInterrupt

    @property
    def pending(self) -> bool:
        """Whether Ctrl-C was pressed and not yet acted on."""
        return self._pending
