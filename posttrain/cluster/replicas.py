"""Engine replicas for asynchronous rollouts (``rollout.mode=async``).

An :class:`EngineReplica` is one copy of the policy with an engine on it. It generates while the
trainer trains its own modules, and takes new weights with :meth:`EngineReplica.load_weights`,
which may be called from another thread while a generation runs. With
``rollout.partial_rollouts`` on the posttrain engine, new weights land between two decode steps:
sequences in flight keep their KV cache (or, with ``rollout.partial_recompute_kv``, are prefilled
again under the new weights) and continue under the new weights, and each token records the
version that sampled it (``Completion.token_versions``). Otherwise an update waits until the
running generation returns.

:class:`LocalReplicaPool` runs replicas in this process, a thread each (``cluster.backend=local``);
``posttrain.cluster.ray_pool`` wraps the same class as Ray actors (``cluster.backend=ray``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import torch

from posttrain.checkpoint.rng import seed_everything
from posttrain.engine import Engine
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
from posttrain.models.moe import prepare_moe_policy
from posttrain.models.weights import iter_weight_buckets
from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.sampling import Completion, SamplingParams

logger = logging.getLogger("posttrain.rollout")


class ReplicaError(PosttrainError):
    """An engine replica failed or did not answer in time."""


def unwrap_policy(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names the engines know: ``torch.compile(model)`` wraps the model
    in an ``OptimizedModule`` whose names gain an ``_orig_mod.`` prefix."""
    return getattr(model, "_orig_mod", model)


class EngineReplica:
    """One engine replica: its own copy of the policy and an engine on it."""

    def __init__(self, cfg: Any, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype,
                 replica_id: int = 0, version: int = 0) -> None:
        """``model`` is this replica's own copy (never the trainer's modules: the trainer changes
        those while the replica generates)."""
        if cfg.rollout.backend not in ("engine", "hf"):
            raise ConfigError(
                f"rollout.backend={cfg.rollout.backend} cannot run engine replicas (rollout.mode=async); use "
                "rollout.backend=engine (posttrain's engine) or hf, or rollout.mode=sync for a remote server."
            )

        self.replica_id = replica_id
        self.model = model
        self.engine = build_engine(cfg.rollout, model, tokenizer, compute_dtype,
                                   max_model_len=engine_max_model_len(cfg, model),
                                   float32_logits=cfg.model.float32_logits, expert_dtype=cfg.moe.expert_dtype)
        self.engine.weight_version = version
        # Between decode steps only the posttrain engine can swap weights; transformers' generate is one call.
        self.partial_rollouts = bool(cfg.rollout.partial_rollouts) and isinstance(self.engine, Engine)
        # rollout.partial_recompute_kv: after such a swap the running sequences are prefilled again
        # under the new weights instead of keeping the keys and values the old weights computed.
        self.recompute_kv = self.partial_rollouts and bool(cfg.rollout.partial_recompute_kv)
        self.requests_done = 0
        self._generate_lock = threading.Lock()  # one generation at a time
        self._load_lock = threading.Lock()  # one weight update at a time
        self._cond = threading.Condition()  # guards _generating and _pending
        self._generating = False
        self._pending: _PendingWeights | None = None
        self.wait_timeout_s = float(cfg.cluster.wait_timeout_s)  # a weight update waiting for a generation
        # On a GPU the replica runs on its own CUDA stream: its decode kernels then overlap with the
        # trainer's kernels (the default stream) instead of queuing behind them.
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_config(cls, cfg: Any, replica_id: int, version: int = 0, device: str | None = None) -> EngineReplica:
        """A replica that loads its own copy of ``cfg.model`` (a Ray actor, in its own process),
        the way the GRPO recipe loads the policy. ``device``: overrides ``cfg.model.device``."""

        torch_device = resolve_device(device or cfg.model.device)
        compute_dtype = resolve_compute_dtype(cfg.model.dtype, torch_device)
        model, tokenizer = load_model_and_tokenizer(cfg.model, torch_device, moe=cfg.moe)
        prepare_moe_policy(model, cfg)
        if cfg.trainer.param_dtype == "bfloat16":  # the trainer's parameter dtype (prepare_for_training), so weights arrive as they are
            model.to(torch.bfloat16)
        model.requires_grad_(False)
        return cls(cfg, model, tokenizer, compute_dtype, replica_id=replica_id, version=version)

    @property
    def version(self) -> int:
        """The policy version of the weights the next sampled token uses."""
        return self.engine.weight_version

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """``params.n`` completions per prompt, sampled after ``seed_everything(seed)`` (as the
        synchronous recipe seeds, then generates); every completion has ``token_versions``."""

        with self._generate_lock:
            with self._cond:
                self._generating = True
            try:
                seed_everything(seed)
                with self._on_stream():
                    out = self._generate(prompts, params)
            finally:
                with self._cond:
                    self._generating = False
                    self._cond.notify_all()
            self.requests_done += len(prompts)
            return out

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """(Holding ``_cond``) until ``done()``; ReplicaError naming the replica after ``wait_timeout_s``."""
        if not self._cond.wait_for(done, timeout=self.wait_timeout_s):
            if self._pending is not None and not done():
                self._pending = None  # withdrawn: the generation must not apply it later
            raise ReplicaError(f"engine replica {self.replica_id} waited {self.wait_timeout_s:g} s for {what} "
                               "(cluster.wait_timeout_s); the generation seems stuck.")

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.partial_rollouts:
            return self.engine.generate(prompts, params, before_step=self._apply_pending)
        return self.engine.generate(prompts, params)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy ``named_tensors`` (names of the policy's ``named_parameters``) into the replica's
        parameters in place, as policy ``version``. Callable from any thread: during a generation
        with partial rollouts the generating thread applies them before its next step; otherwise
        this waits until the generation returns. Returns once the weights are in."""
        items = list(named_tensors)
        with self._load_lock:
            pending = _PendingWeights(items, version, self._stream, self.recompute_kv)
            with self._cond:
                if self.partial_rollouts and self._generating:
                    self._pending = pending
                    self._wait(lambda: not (self._pending is pending and self._generating),
                               f"its generation to reach a decode step and load policy version {version}")
                    if self._pending is pending:  # the generation ended first: apply here
                        self._pending = None
                        pending.apply(self.engine)
                else:
                    self._wait(lambda: not self._generating,
                               f"its generation to finish before loading policy version {version}")
                    pending.apply(self.engine)
            if pending.error is not None:
                raise pending.error

    def _apply_pending(self) -> None:
        """Before each engine step (partial rollouts): load weights another thread handed over."""
        if self._pending is None:  # the hot path: one attribute read per step
            return
        with self._cond:
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.apply(self.engine)
                self._cond.notify_all()

    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        """``(name, shape, dtype name)`` of every tensor :meth:`load_weights` accepts, in the order
        the trainer sends them (``iter_weight_buckets``: each tied weight once)."""
        return [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
                for bucket in iter_weight_buckets(self.model, float("inf")) for name, t in bucket]

    def info(self) -> dict:
        return {"replica_id": self.replica_id, "version": self.version, "pid": os.getpid(),
                "device": str(self.device), "requests_done": self.requests_done}

    def close(self) -> None:
        """Free the engine's KV cache (the model goes with the replica). A generation still running
        (a replica that timed out) keeps it: closing must not wait on a hung replica."""
        if self._generate_lock.acquire(blocking=False):
            try:
                self.engine.sleep()
            finally:
                self._generate_lock.release()


class _PendingWeights:
    """Weights handed from a loading thread to the generating one; an error goes back to the loader."""

    def __init__(self, items: list[tuple[str, torch.Tensor]], version: int, stream: torch.cuda.Stream | None,
                 recompute_kv: bool = False) -> None:
        self.items = items
        self.version = version
        self.recompute_kv = recompute_kv
        self.error: BaseException | None = None
        self.stream = stream
        # The tensors were written on the loading thread's stream (the optimizer step): the replica's
        # stream waits for that work before copying them.
        self.ready = None
        if stream is not None:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def apply(self, engine: Any) -> None:
        try:
            if self.stream is None:
                engine.update_weights(dict(self.items))  # in place (CUDA graphs stay valid); drops cached prefixes
            else:
                self.stream.wait_event(self.ready)
                with torch.cuda.stream(self.stream):
                    engine.update_weights(dict(self.items))
                # The trainer changes its parameters in place after this returns: the copy must be done.
                self.stream.synchronize()
            engine.weight_version = self.version
            if self.recompute_kv:  # on the generating thread, between two steps: nothing runs meanwhile
                engine.recompute_kv_cache()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that asked for the load
            self.error = e


class LocalReplicaPool:
    """Replicas in this process, each generating in its own thread.

    One replica reproduces the synchronous recipe exactly. With several, unseeded sampling draws
    from the process's one torch RNG from several threads at once, so samples differ run to run
    (requests with ``SamplingParams.seed`` use their own generators and do not)."""

    def __init__(self, replicas: list[EngineReplica], timeout_s: float) -> None:
        if not replicas:
            raise ValueError("LocalReplicaPool needs at least one replica")
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.num_replicas = len(replicas)
        self._executor = ThreadPoolExecutor(max_workers=self.num_replicas, thread_name_prefix="posttrain-replica")

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """Contiguous chunks of ``prompts``, one per replica, generated concurrently; chunk ``i``
        is seeded ``seed + i`` (one replica: exactly ``seed``). Results are in prompt order."""
        chunks = split_contiguous(len(prompts), self.num_replicas)
        futures = {}
        for i, (start, end) in enumerate(chunks):
            if end > start:
                futures[i] = self._executor.submit(self.replicas[i].generate, prompts[start:end], params, seed + i)
        done, not_done = wait(futures.values(), timeout=self.timeout_s, return_when=FIRST_EXCEPTION)
        for i, future in futures.items():
            if future in done and future.exception() is not None:
                replica_id = self.replicas[i].replica_id
                raise ReplicaError(f"engine replica {replica_id} failed: {future.exception()!r}") from future.exception()
        if not_done:
            late = [self.replicas[i].replica_id for i, f in futures.items() if f in not_done]
            raise ReplicaError(
                f"engine replica(s) {', '.join(map(str, late))} did not finish generating {len(prompts)} prompts within "
                f"cluster.wait_timeout_s={self.timeout_s:g}s; raise it if generation is just slow."
            )
        return [group for i in sorted(futures) for group in futures[i].result()]

    def push_weights(self, model: torch.nn.Module, version: int) -> dict[str, float]:
        """The trainer policy's weights into every replica, as ``version``. Returns once every
        replica holds them (with partial rollouts that is at most one decode step)."""
        start = time.perf_counter()
        named = [item for bucket in iter_weight_buckets(unwrap_policy(model), float("inf")) for item in bucket]
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        for replica in self.replicas:
            replica.load_weights(named, version)
        return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(nbytes * self.num_replicas)}

    def metrics(self) -> dict[str, float]:
        return {"rollout/replica_restarts": 0.0,  # in-process replicas do not restart: a failure stops the run
                "rollout/replica_version_min": float(min(r.version for r in self.replicas))}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for replica in self.replicas:
            replica.close()


def split_contiguous(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """``num_parts`` contiguous ``(start, end)`` ranges covering ``range(num_items)``; the first
    ``num_items % num_parts`` are one longer."""
    base, extra = divmod(num_items, num_parts)
    ranges, start = [], 0
    for i in range(num_parts):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges
