"""The rollout API's state as pure logic (no HTTP): the queue of scored groups with its fair
per-environment bound, leases, staleness, and JSONL journal; and the optional prompt feed.
The HTTP layer is ``rollout_api.py``; docs/rollout_api.md describes the behaviour."""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("posttrain.rollout_api")

MAX_ENVIRONMENTS = 1024  # registered names; each adds at most one group to the queue bound
COMPACT_EVERY = 10_000  # journal events between rewrites (plus twice the live groups)


class QueueFull(Exception):
    """The environment holds its share of the queue; it should retry later."""


class TooManyEnvironments(Exception):
    """``MAX_ENVIRONMENTS`` names are registered already."""


class UnknownEnvironment(Exception):
    """A group names an environment that has not registered."""


class GroupQueue:
    """Scored groups waiting for the trainer, with leases, staleness and an optional journal.

    A group is a JSON-able dict with at least ``env`` and ``policy_version`` (see
    ``GroupSubmission``); the queue adds an ``id``.
    """

    def __init__(self, *, max_groups: int, max_staleness: int, journal: str | Path | None = None) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.max_groups = max_groups
        self.max_staleness = max_staleness  # < 0: never drop
        self.policy_version = 0
        self.queued: deque[dict[str, Any]] = deque()
        self.leased: dict[str, list[dict[str, Any]]] = {}  # batch id -> groups handed to the trainer
        self.envs: dict[str, dict[str, int]] = {}  # name -> group_size and counters
        self.next_id = 0
        self.journal_path = Path(journal) if journal else None
        self._journal = None
        self._events_since_compaction = 0
        if self.journal_path is not None:
            self._replay()
            self._compact()
            self._journal = open(self.journal_path, "a", encoding="utf-8")

    # -- environments --------------------------------------------------------------------------

    def register(self, name: str, group_size: int) -> dict[str, Any]:
        known = self.envs.get(name)
        if known is None and len(self.envs) >= MAX_ENVIRONMENTS:
            raise TooManyEnvironments()
        if known is not None and known["group_size"] != group_size:
            # A restarted environment may change its group size; the groups already queued keep theirs.
            logger.info("environment %s re-registered with group size %d (was %d)", name, group_size, known["group_size"])
        self.envs.setdefault(name, {"group_size": group_size, "submitted": 0, "consumed": 0, "dropped_stale": 0})
        self.envs[name]["group_size"] = group_size
        self._write({"op": "register", "name": name, "group_size": group_size})
        return {"env": name, "group_size": group_size, "policy_version": self.policy_version,
                "max_staleness": self.max_staleness}

    def submit(self, group: dict[str, Any]) -> str:
        """Queue ``group``; returns ``"queued"`` or ``"dropped_stale"``. Raises QueueFull or UnknownEnvironment."""
        env = self.envs.get(group["env"])
        if env is None:
            raise UnknownEnvironment(group["env"])
        if sum(g["env"] == group["env"] for g in self.queued) >= self.share():
            raise QueueFull()
        group = {**group, "id": self.next_id}
        self.next_id += 1
        env["submitted"] += 1
        self._write({"op": "group", "group": group})
        stale = self._is_stale(group)
        if stale:
            self._drop([group], "stale")
        else:
            self.queued.append(group)
        self._maybe_compact()
        return "dropped_stale" if stale else "queued"

    def share(self) -> int:
        """Queued groups one environment may hold: the bound split evenly between environments."""
        return -(-self.max_groups // max(len(self.envs), 1))

    # -- the trainer ---------------------------------------------------------------------------

    def take(self, size: int) -> tuple[str, list[dict[str, Any]]] | None:
        """Lease ``size`` fresh groups under a new batch id; None while fewer are queued.

        Environments take turns (each one's oldest group first), so one fast environment cannot
        crowd the others out of a batch."""
        self._drop_stale()
        self._maybe_compact()
        if len(self.queued) < size:
            return None
        by_env: dict[str, deque[dict[str, Any]]] = {}
        for g in self.queued:
            by_env.setdefault(g["env"], deque()).append(g)
        groups: list[dict[str, Any]] = []
        while len(groups) < size:
            for waiting in by_env.values():
                if waiting and len(groups) < size:
                    groups.append(waiting.popleft())
        taken = {g["id"] for g in groups}
        self.queued = deque(g for g in self.queued if g["id"] not in taken)
        batch_id = uuid.uuid4().hex
        self.leased[batch_id] = groups
        return batch_id, groups

    def ack(self, batch_id: str) -> int:
        """The trainer has trained on this batch: forget it. Returns the number of groups (0: unknown id)."""
        groups = self.leased.pop(batch_id, [])
        if groups:
            self._drop(groups, "consumed")
            self._maybe_compact()
        return len(groups)

    def set_policy_version(self, version: int) -> int:
        """The trainer's policy is now at ``version``; returns the number of groups dropped as stale."""
        self.policy_version = version
        self._write({"op": "version", "version": version})
        dropped = self._drop_stale()
        self._maybe_compact()
        return dropped

    def trainer_start(self, version: int) -> int:
        """A (re)started trainer: leased groups it never acked return to the front of the queue."""
        requeued = [g for groups in self.leased.values() for g in groups]
        self.leased.clear()
        self.queued.extendleft(reversed(requeued))
        self.set_policy_version(version)
        return len(requeued)

    def status(self) -> dict[str, Any]:
        totals = {k: sum(e[k] for e in self.envs.values()) for k in ("submitted", "consumed", "dropped_stale")}
        return {
            "policy_version": self.policy_version, "max_staleness": self.max_staleness,
            "queued": len(self.queued), "max_groups": self.max_groups, "share_per_env": self.share(),
            "leased": sum(len(g) for g in self.leased.values()),
            **totals, "envs": {name: {**e, "queued": sum(g["env"] == name for g in self.queued)}
                               for name, e in self.envs.items()},
            "journal": str(self.journal_path) if self.journal_path else None,
        }

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- internals -----------------------------------------------------------------------------

    def _is_stale(self, group: dict[str, Any]) -> bool:
        return self.max_staleness >= 0 and self.policy_version - group["policy_version"] > self.max_staleness

    def _drop_stale(self) -> int:
        stale = [g for g in self.queued if self._is_stale(g)]
        if stale:
            ids = {g["id"] for g in stale}
            self.queued = deque(g for g in self.queued if g["id"] not in ids)
            self._drop(stale, "stale")
            logger.info("dropped %d stale groups (policy version %d, max_staleness %d)", len(stale),
                        self.policy_version, self.max_staleness)
        return len(stale)

    def _drop(self, groups: list[dict[str, Any]], why: Literal["stale", "consumed"]) -> None:
        counter = "dropped_stale" if why == "stale" else "consumed"
        for g in groups:
            if g["env"] in self.envs:
                self.envs[g["env"]][counter] += 1
        self._write({"op": "done", "why": why, "ids": [g["id"] for g in groups]})

    def _write(self, event: dict[str, Any]) -> None:
        if self._journal is not None:
            self._journal.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._journal.flush()  # a crash of this process loses nothing written before it
            self._events_since_compaction += 1

    def _maybe_compact(self) -> None:
        """Called at the end of each change (state and journal agree then). Consumed and dropped
        groups stay in the file until it is rewritten: keep it near the live size."""
        if self._journal is not None and self._events_since_compaction > COMPACT_EVERY + 2 * len(self.queued):
            self._compact()

    def _replay(self) -> None:
        if not self.journal_path.exists():
            return
        pending: dict[int, dict[str, Any]] = {}
        with open(self.journal_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                event = json.loads(line)
            except ValueError:
                # Only the last line can be cut short (a crash while writing it); it was never acknowledged.
                logger.warning("journal %s: line %d is not JSON; skipped", self.journal_path, number)
                continue
            op = event.get("op")
            if op == "snapshot":
                self.envs = event["envs"]
                self.policy_version = event["policy_version"]
                self.next_id = event["next_id"]
            elif op == "register":
                self.envs.setdefault(event["name"], {"submitted": 0, "consumed": 0, "dropped_stale": 0})
                self.envs[event["name"]]["group_size"] = event["group_size"]
            elif op in ("group", "live"):  # "live": a group carried over by compaction, counted already
                group = event["group"]
                pending[group["id"]] = group
                self.next_id = max(self.next_id, group["id"] + 1)
                if op == "group" and group["env"] in self.envs:
                    self.envs[group["env"]]["submitted"] += 1
            elif op == "done":
                counter = "dropped_stale" if event["why"] == "stale" else "consumed"
                for gid in event["ids"]:
                    group = pending.pop(gid, None)
                    if group is not None and group["env"] in self.envs:
                        self.envs[group["env"]][counter] += 1
            elif op == "version":
                self.policy_version = event["version"]
        self.queued = deque(pending.values())  # leased-but-unacked groups are back in line, in order
        logger.info("journal %s: %d groups restored, policy version %d", self.journal_path, len(self.queued),
                    self.policy_version)

    def _compact(self) -> None:
        """Rewrite the journal as one snapshot plus the live (queued and leased) groups, atomically."""
        if self._journal is not None:
            self._journal.close()
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        live = [*(g for groups in self.leased.values() for g in groups), *self.queued]
        with open(tmp, "w", encoding="utf-8") as f:
            snapshot = {"op": "snapshot", "envs": self.envs, "policy_version": self.policy_version,
                        "next_id": self.next_id}
            f.write(json.dumps(snapshot) + "\n")
            for group in live:
                f.write(json.dumps({"op": "live", "group": group}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)
        self._events_since_compaction = 0
        if self._journal is not None:
            self._journal = open(self.journal_path, "a", encoding="utf-8")


class PromptFeed:
    """Rows of a JSONL file for environments that take their prompts from the rollout API
    (``GET /prompts``): a seeded shuffle per epoch, handed out in order, epoch after epoch. The
    position is not journaled: a restarted server starts the file again."""

    def __init__(self, path: str | Path, seed: int = 0) -> None:
        self.rows: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}, line {number}: not valid JSON") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: expected a JSON object per line")
                self.rows.append(row)
        if not self.rows:
            raise ValueError(f"{path} holds no rows")
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` rows as ``{"index", "epoch", "row"}``."""
        out = []
        for _ in range(n):
            if self.position == len(self.order):
                self.epoch += 1
                self.position, self.order = 0, self._shuffled(self.epoch)
            index = self.order[self.position]
            self.position += 1
            out.append({"index": index, "epoch": self.epoch, "row": self.rows[index]})
        return out
