"""The trainer's side of weight sync: the chosen mode (by ``sync.mode``) plus the cadence.

Before each rollout the recipe calls :meth:`WeightSyncDriver.before_rollout`, which re-syncs at
once if the engine restarted (a new ``instance_id``: its weights are the initial ones again).
After each policy update it calls :meth:`WeightSyncDriver.after_update`, which asks the cadence
whether to sync, and if so pushes the weights; it reports ``sync/seconds`` and ``sync/bytes``
(0 when nothing moved) and ``sync/staleness`` (versions the engine lags behind).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from posttrain.sampling import RolloutEngine
from posttrain.sync.base import WeightSync, wire_dtype
from posttrain.sync.broadcast import BroadcastSync
from posttrain.sync.cadence import SyncCadence
from posttrain.sync.checkpoint import CheckpointSync
from posttrain.sync.client import EngineClient
from posttrain.sync.lora import LoraSync
from posttrain.sync.shared import SharedSync

logger = logging.getLogger("posttrain.sync")


def _shared(sync: Any, model: torch.nn.Module, engine: RolloutEngine, client: EngineClient | None) -> WeightSync:
    return SharedSync(engine, model, client)  # client None: the engine is in this process


def _broadcast(sync: Any, model: torch.nn.Module, engine: RolloutEngine, client: EngineClient | None) -> WeightSync:
    return BroadcastSync(model, _need(client), master_address=sync.master_address, master_port=sync.master_port,
                         backend=sync.backend, bucket_mb=sync.bucket_mb, dtype=wire_dtype(sync.dtype),
                         timeout_s=sync.collective_timeout_s)


def _checkpoint(sync: Any, model: torch.nn.Module, engine: RolloutEngine, client: EngineClient | None) -> WeightSync:
    return CheckpointSync(model, _need(client), sync.checkpoint_dir, wire_dtype(sync.dtype))


def _lora(sync: Any, model: torch.nn.Module, engine: RolloutEngine, client: EngineClient | None) -> WeightSync:
    return LoraSync(model, _need(client), sync.checkpoint_dir)


def _need(client: EngineClient | None) -> EngineClient:
    if client is None:
        raise ValueError("this sync mode needs a remote engine (rollout.backend=openai)")
    return client


SYNC_MODES: dict[str, Callable[..., WeightSync]] = {
    "shared": _shared, "broadcast": _broadcast, "checkpoint": _checkpoint, "lora": _lora,
}


def resolve_sync_mode(sync: Any, rollout_backend: str, lora: bool) -> str:
    """``sync.mode`` (the ``sync`` config section) with 'auto' resolved: shared with an engine in
    this process (``rollout_backend`` hf or engine), lora for a LoRA policy on a server, else
    checkpoint (the mode that needs nothing but a shared folder)."""
    if sync.mode != "auto":
        return sync.mode
    if rollout_backend in ("hf", "engine"):  # in-process engines run the trainer's own modules
        return "shared"
    return "lora" if lora else "checkpoint"


class WeightSyncDriver:
    def __init__(self, mode: WeightSync, cadence: SyncCadence, client: EngineClient | None = None,
                 engine: RolloutEngine | None = None) -> None:
        self.mode = mode
        self.cadence = cadence
        self.client = client
        self.engine = engine
        self.instance_id: str | None = None
        self._set_engine_version(cadence.synced_version)

    def _set_engine_version(self, version: int) -> None:
        """The policy version the engine holds. An in-process engine (posttrain's, transformers')
        stamps every token it samples with its ``weight_version``, so it follows each sync: the
        tokens then say which weights sampled them, and ``off_policy/staleness_*`` how far behind the
        trainer those were. A remote engine is told the version with the weights themselves."""
        self.engine_version = version
        if self.client is None and hasattr(self.engine, "weight_version"):
            self.engine.weight_version = version

    def start(self, policy_version: int, resumed: bool, step: int = 0) -> dict[str, float]:
        """Before the first rollout: connect, and push the weights once to a separate engine (it
        may serve another checkpoint, and after a resume it certainly does). ``step``: the step the
        run starts from (the resumed checkpoint's), which the log lines and errors name."""
        self.instance_id = self._engine_instance()
        self.mode.connect(step)
        if resumed or self.client is not None:
            self.cadence.force("resume" if resumed else "start")
            return self.after_update(policy_version, step=step)
        return {}

    def before_rollout(self, policy_version: int, step: int) -> None:
        """Before generating: if the engine restarted (a new ``instance_id``: its weights are the
        ones it loaded at start), reconnect and push the current weights at once."""
        instance = self._engine_instance()
        if instance is not None and self.instance_id is not None and instance != self.instance_id:
            logger.warning("step %d: the engine at %s restarted; reconnecting and syncing", step, self.client.base_url)
            self.instance_id = instance
            self.engine_version = 0
            self.mode.connect(step)
            self.cadence.force("engine restart")
            self.after_update(policy_version, step)
        self.instance_id = instance or self.instance_id

    def after_update(self, policy_version: int, step: int) -> dict[str, float]:
        """Sync if the cadence says so; returns this step's sync metrics."""
        reason = self.cadence.decide(policy_version, [self.engine_version])
        if reason is None:
            return {"sync/seconds": 0.0, "sync/bytes": 0.0, "sync/staleness": float(policy_version - self.engine_version)}
        start = time.perf_counter()
        moved = self.mode.push(policy_version, step)
        seconds = time.perf_counter() - start
        self.cadence.record_sync(policy_version)
        self._set_engine_version(policy_version)
        if reason != "interval":
            logger.info("step %d: weight sync (%s, %s): %.1f MB in %.3fs", step, self.mode.name, reason,
                        moved / 2**20, seconds)
        return {"sync/seconds": seconds, "sync/bytes": float(moved), "sync/staleness": 0.0}

    def _engine_instance(self) -> str | None:
        if self.client is None:
            return None
        info = self.client.weight_version()
        return info.get("instance_id") if isinstance(info, dict) else None

    def close(self) -> None:
        self.mode.close()
        if self.client is not None:
            self.client.close()


def build_weight_sync(sync: Any, model: torch.nn.Module, engine: RolloutEngine, *, rollout_backend: str,
                      lora: bool, client: EngineClient | None = None, start_version: int = 0) -> WeightSyncDriver:
    """The driver for the ``sync`` config section: the mode (``resolve_sync_mode``) and the cadence.
    ``client``: the remote engine's (rollout.backend=openai), None for an engine in this process."""
    mode = SYNC_MODES[resolve_sync_mode(sync, rollout_backend, lora)](sync, model, engine, client)
    cadence = SyncCadence(sync.interval, sync.max_staleness, sync.timeout_s, synced_version=start_version)
    return WeightSyncDriver(mode, cadence, client, engine)
