"""When to sync: pure decision logic over policy versions and a clock.

A *policy version* counts the trainer's optimizer steps; each engine holds the version it last
received. After every policy update the trainer asks :meth:`SyncCadence.decide`, which names the
reason for a sync or returns ``None``:

- ``forced``: a sync was requested by :meth:`force` (after a resume, or when an engine restarted
  and lost its weights), whatever the versions;
- ``interval``: ``interval`` optimizer steps have passed since the last sync;
- ``staleness``: some engine lags more than ``max_staleness`` versions behind (0: off);
- ``timeout``: ``timeout_s`` seconds have passed since the last sync and the policy changed (0: off).

Nothing here touches weights, so it is tested with hand-written timelines and a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class SyncCadence:
    def __init__(self, interval: int = 1, max_staleness: int = 0, timeout_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, synced_version: int = 0) -> None:
        """``synced_version``: the policy version the engines start with (0 for a fresh run)."""
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if max_staleness < 0 or timeout_s < 0:
            raise ValueError("max_staleness and timeout_s must be >= 0 (0: off)")
        self.interval = interval
        self.max_staleness = max_staleness
        self.timeout_s = timeout_s
        self.clock = clock
        self.synced_version = synced_version
        self.synced_at = clock()
        self.forced_reason: str | None = None

    def force(self, reason: str) -> None:
        """Make the next :meth:`decide` sync, e.g. ``force("resume")`` or ``force("engine restart")``."""
        self.forced_reason = reason

    def decide(self, policy_version: int, engine_versions: Sequence[int] = ()) -> str | None:
        """The reason to sync now, or ``None``. ``engine_versions``: the version each engine holds
        (default: every engine holds the last synced version)."""
        if self.forced_reason is not None:
            return "forced"
        if policy_version <= self.synced_version and all(v >= policy_version for v in engine_versions):
            return None  # nothing new to send
        if policy_version - self.synced_version >= self.interval:
            return "interval"
        lag = max((policy_version - v for v in engine_versions), default=policy_version - self.synced_version)
        if self.max_staleness and lag > self.max_staleness:
            return "staleness"
        if self.timeout_s and self.clock() - self.synced_at >= self.timeout_s:
            return "timeout"
        return None

    def record_sync(self, policy_version: int) -> None:
        """Every engine now holds ``policy_version``."""
        self.synced_version = policy_version
        self.synced_at = self.clock()
        self.forced_reason = None
