"""Engine replicas as Ray actors (``cluster.backend=ray``), their weight pushes and their faults.

Each replica is an :class:`~posttrain.cluster.replicas.EngineReplica` in an actor of its own
(``rollout.gpus_per_replica`` GPUs) that loads ``cfg.model`` itself and is then given the trainer's
weights. The actor is threaded, so a weight push and ``info`` run while it generates.

Weights go out as ``sync.mode`` says: 'broadcast' makes the trainer rank 0 and the replicas ranks
1..N of a :class:`~posttrain.sync.broadcast.WeightGroup` (NCCL between distinct GPUs, else gloo);
'checkpoint' writes one safetensors file (``sync.checkpoint_dir``, default /dev/shm) that every
replica reads, the only choice when a replica shares a GPU (NCCL cannot put two ranks on one).

A replica that dies is replaced by a fresh actor holding the last pushed weights, and its share of
the batch is generated again with the same seed, so no step is lost; after
``cluster.max_replica_restarts`` deaths of one replica the run stops with Ray's cause and the end of
the replica's stderr.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from posttrain.cluster.ray_cluster import death_report, import_ray, init_ray
from posttrain.cluster.replicas import EngineReplica, ReplicaError, split_contiguous, unwrap_policy
from posttrain.errors import ConfigError
from posttrain.models.weights import iter_weight_buckets, weights_checksum
from posttrain.sampling import Completion, SamplingParams
from posttrain.sync.base import dtype_name, transfer_dir, wire_dtype
from posttrain.sync.broadcast import WeightGroup, master_store
from posttrain.sync.checkpoint import WEIGHTS_FILE, StagingBuffer, save_weights, weights_nbytes

logger = logging.getLogger("posttrain.cluster")


def device_uuid(device: torch.device) -> str | None:
    """A GPU's UUID: the same card has the same one in every process, whatever CUDA_VISIBLE_DEVICES says."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def choose_weight_transport(mode: str, backend: str, trainer_gpu: str | None,
                            replica_gpus: list[str | None]) -> tuple[str, str, str]:
    """``(sync mode, group backend, why)`` for Ray replicas placed on ``replica_gpus`` (GPU UUIDs,
    None: CPU) with the trainer on ``trainer_gpu``. NCCL cannot put two ranks on one GPU, so
    'auto' writes a checkpoint when any GPU is shared, else broadcasts (NCCL when every rank has a
    GPU of its own, else gloo through host memory)."""
    gpus = [g for g in [trainer_gpu, *replica_gpus] if g is not None]
    shared = len(gpus) != len(set(gpus))
    all_on_gpus = trainer_gpu is not None and all(replica_gpus)
    if backend == "auto":
        backend = "nccl" if all_on_gpus and not shared else "gloo"
    if mode not in ("auto", "broadcast", "checkpoint"):
        raise ConfigError(f"sync.mode={mode} cannot reach Ray replicas (rollout.mode=async, cluster.backend=ray); use "
                          "auto, broadcast or checkpoint.")
    if mode == "broadcast" and backend == "nccl" and shared:
        raise ConfigError(
            "sync.mode=broadcast with sync.backend=nccl, but the trainer and a replica (or two replicas) share a GPU "
            "(rollout.gpus_per_replica below 1, or a replica on the trainer's GPU); NCCL cannot put two ranks on one "
            "GPU. Use sync.mode=checkpoint (or auto), sync.backend=gloo, or give each replica a GPU of its own."
        )
    if mode == "auto":
        if shared:
            return "checkpoint", backend, "a GPU is shared by the trainer and a replica or by two replicas, which NCCL cannot"
        return "broadcast", backend, f"every rank on a device of its own: a {backend} group, trainer rank 0"
    return mode, backend, f"sync.mode={mode}" + (f", sync.backend={backend}" if mode == "broadcast" else "")


class EngineReplicaActor:
    """The body of one replica actor: an EngineReplica plus the receiving end of weight pushes."""

    def __init__(self, cfg: Any, replica_id: int, version: int, device: str) -> None:
        self.replica = EngineReplica.from_config(cfg, replica_id, version=version, device=device)
        self.group: WeightGroup | None = None
        self.received: tuple[int, list[tuple[str, torch.Tensor]]] | None = None

    def describe(self) -> dict:
        return {**self.replica.info(), "device_uuid": device_uuid(self.replica.device)}

    def info(self) -> dict:
        return self.replica.info()

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        return self.replica.generate(prompts, params, seed)

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int, name: str, backend: str,
                          timeout_s: float) -> None:
        self.close_group()
        self.group = WeightGroup(address, port, rank, world_size, name, backend, timeout_s)

    def receive_broadcast(self, specs: list[tuple[str, list[int], str]], version: int) -> None:
        """Receive ``specs``' tensors from rank 0, in order; :meth:`apply_received` loads them. Two
        calls so that the transfer's timeout is not spent waiting for a generation to end."""
        assert self.group is not None, "join_weight_group first"
        device = self.replica.device if self.group.backend == "nccl" else torch.device("cpu")
        items = []
        for name, shape, dtype in specs:
            buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            items.append((name, self.group.broadcast(buffer)))
        self.received = (version, items)

    def apply_received(self) -> int:
        assert self.received is not None, "receive_broadcast first"
        version, items = self.received
        self.received = None
        self.replica.load_weights(items, version)
        return version

    def load_checkpoint(self, path: str, version: int) -> int:
        self.replica.load_weights(load_file(path, device=str(self.replica.device)).items(), version)
        return version

    def load_tensors(self, named: dict[str, torch.Tensor], version: int) -> int:
        self.replica.load_weights(named.items(), version)
        return version

    def weights_checksum(self) -> str:
        return weights_checksum(self.replica.model)

    def close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def close(self) -> None:
        self.close_group()
        self.replica.close()


class RayReplicaPool:
    """``rollout.num_replicas`` replica actors; the ReplicaPool protocol of ``posttrain.cluster.replicas``.

    Thread-safe: the producer and validation may generate at once while the trainer pushes."""

    def __init__(self, cfg: Any, start_version: int, model: torch.nn.Module) -> None:
        self.ray = import_ray()
        self.cfg = cfg
        self.num_replicas = cfg.rollout.num_replicas
        self.timeout_s = cfg.cluster.wait_timeout_s
        self.collective_timeout_s = cfg.sync.collective_timeout_s
        self.max_restarts = cfg.cluster.max_replica_restarts
        self.owns_ray = init_ray(cfg.cluster)
        self._lock = threading.RLock()  # guards actors, the weight group and the last pushed weights
        self.restarts = [0] * self.num_replicas
        self.versions = [start_version] * self.num_replicas
        self.actors: list[Any] = []
        self.described: list[dict] = []
        self._group: WeightGroup | None = None
        self._folder: Path | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None  # broadcast: the last pushed weights, for restarts
        self._latest_version = start_version
        self._staging = StagingBuffer()
        self._dtype = wire_dtype(cfg.sync.dtype)
        policy = unwrap_policy(model)
        self._trainer_device = next(policy.parameters()).device
        try:
            actors = [self._spawn(i, start_version) for i in range(self.num_replicas)]
            self.actors = [a for a, _ in actors]
            self.described = [self._wait(ref, i, "start (load the model)", self.timeout_s) for i, (_, ref) in enumerate(actors)]
            self.mode, self.backend, reason = choose_weight_transport(
                cfg.sync.mode, cfg.sync.backend, device_uuid(self._trainer_device),
                [d["device_uuid"] for d in self.described])
            logger.info("Ray replicas: %d actor(s) on %s; weights by %s (%s)", self.num_replicas,
                        ", ".join(d["device"] for d in self.described), self.mode, reason)
            if self.mode == "checkpoint":
                self._folder = transfer_dir(cfg.sync.checkpoint_dir, "weights", weights_nbytes(policy, self._dtype))
            self.push_weights(model, start_version)
        except BaseException:
            self.close()
            raise

    # -- actors -----------------------------------------------------------------------------------

    def _spawn(self, i: int, version: int) -> tuple[Any, Any]:
        gpus = self.cfg.rollout.gpus_per_replica
        actor_cls = self.ray.remote(EngineReplicaActor).options(
            num_cpus=1, num_gpus=gpus, max_concurrency=4, max_restarts=0)
        actor = actor_cls.remote(self.cfg, i, version, "cuda" if gpus > 0 else "cpu")
        return actor, actor.describe.remote()

    def _wait(self, ref: Any, i: int, what: str, timeout_s: float, setting: str = "cluster.wait_timeout_s") -> Any:
        """``ray.get`` of one replica's call, with a timeout whose message names the replica and the call."""
        try:
            return self.ray.get(ref, timeout=timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise ReplicaError(
                f"Engine replica {i} did not {what} within {setting}={timeout_s:g}s. It may be waiting for resources "
                f"(rollout.gpus_per_replica={self.cfg.rollout.gpus_per_replica}: see `ray status`) or just be slow; "
                f"raise {setting} if so."
            ) from None
        except self.ray.exceptions.RayTaskError as exc:
            raise ReplicaError(f"Engine replica {i} failed to {what}: {exc.cause!r}") from exc.cause

    def _dead(self, exc: BaseException) -> bool:
        e = self.ray.exceptions
        return isinstance(exc, (e.RayActorError, e.OutOfMemoryError, e.WorkerCrashedError))

    def _restart(self, i: int, dead_actor: Any, exc: BaseException) -> None:
        """Replace replica ``i`` (if ``dead_actor`` is still its actor: another thread may have
        already) with a fresh one holding the last pushed weights. A fresh actor that dies too
        (e.g. an OOM kill while loading) counts as another restart."""
        with self._lock:
            if self.actors[i] is not dead_actor:
                return
            while True:
                self._count_death(i, dead_actor, exc)
                self.ray.kill(dead_actor, no_restart=True)
                actor, ref = self._spawn(i, self._latest_version)
                self.actors[i] = actor
                try:
                    self.described[i] = self._wait(ref, i, "restart (load the model)", self.timeout_s)
                    if self.mode == "checkpoint":
                        loaded = actor.load_checkpoint.remote(str(self._folder / WEIGHTS_FILE), self._latest_version)
                    else:
                        loaded = actor.load_tensors.remote(self.ray.put(self._snapshot), self._latest_version)
                        self._close_group()  # the new actor is not in the group: form it again at the next push
                    self.versions[i] = self._wait(
                        loaded, i, f"load policy version {self._latest_version} after its restart", self.timeout_s)
                    return
                except Exception as again:
                    if not self._dead(again):
                        raise
                    dead_actor, exc = actor, again

    def _count_death(self, i: int, actor: Any, exc: BaseException) -> None:
        """Count one death of replica ``i``; past ``cluster.max_replica_restarts``, stop with the cause."""
        info = self.described[i] if i < len(self.described) else {}
        report = death_report(exc, info.get("pid"), actor._actor_id.hex())
        self.restarts[i] += 1
        if self.restarts[i] > self.max_restarts:
            raise ReplicaError(
                f"Engine replica {i} (Ray actor, pid {info.get('pid')}, {info.get('device')}) died "
                f"{self.restarts[i]} times, more than cluster.max_replica_restarts={self.max_restarts}. Last cause: "
                f"{report}\nFix: if it was killed for memory (OOM), give each replica more (rollout.gpus_per_replica, "
                "a larger node) or generate less at once (rollout.generation_batch_size, rollout.engine.max_num_seqs); "
                "if it crashed, its stderr above and the Ray session logs say why; raise "
                "cluster.max_replica_restarts to tolerate more restarts."
            )
        logger.warning("Engine replica %d died (%s); restarting it (%d of %d allowed)", i,
                       report.splitlines()[0][:300], self.restarts[i], self.max_restarts)

    # -- generation --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """Contiguous chunks of ``prompts``, one per replica, generated concurrently; chunk ``i``
        is seeded ``seed + i``. A chunk whose replica dies is generated again by its restarted
        replica with the same seed. Results are in prompt order."""
        chunks = split_contiguous(len(prompts), self.num_replicas)
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(i: int) -> None:
            start, end = chunks[i]
            actor = self.actors[i]
            pending[actor.generate.remote(prompts[start:end], params, seed + i)] = (i, actor)

        for i, (start, end) in enumerate(chunks):
            if end > start:
                submit(i)
        results: dict[int, list[list[Completion]]] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(i for i, _ in pending.values())
                raise ReplicaError(
                    f"Engine replica(s) {', '.join(map(str, late))} did not finish generating their share of "
                    f"{len(prompts)} prompts within cluster.wait_timeout_s={self.timeout_s:g}s; raise it if generation "
                    "is just slow, else check the replicas' logs (Ray session folder, worker-*.err)."
                )
            for ref in ready:
                i, actor = pending.pop(ref)
                try:
                    results[i] = self.ray.get(ref)
                except Exception as exc:
                    if self._dead(exc):
                        self._restart(i, actor, exc)
                        submit(i)
                        deadline = time.monotonic() + self.timeout_s  # the restarted replica starts over
                    elif isinstance(exc, self.ray.exceptions.RayTaskError):
                        raise ReplicaError(f"Engine replica {i} failed generating: {exc.cause!r}") from exc.cause
                    else:
                        raise
        return [group for i in sorted(results) for group in results[i]]

    # -- weights ---------------------------------------------------------------------------------

    def push_weights(self, model: torch.nn.Module, version: int) -> dict[str, float]:
        """The trainer policy's weights into every replica, as ``version``; returns once every
        replica holds them ({"sync/seconds", "sync/bytes"}). A replica that dies meanwhile is
        restarted (it gets these weights) and the push repeated."""
        policy = unwrap_policy(model)
        start = time.perf_counter()
        with self._lock:
            while True:
                try:
                    nbytes = self._push(policy, version)
                    break
                except Exception as exc:  # noqa: BLE001 - a dead replica shows up as many kinds of error
                    dead = self._find_dead()
                    if not dead and isinstance(exc, ReplicaError):
                        raise
                    if not dead:
                        raise ReplicaError(
                            f"Weight push of policy version {version} to the engine replicas ({self.mode}) failed: "
                            f"{type(exc).__name__}: {exc}. Every replica still answers, so see the replicas' stderr "
                            "(Ray session folder, worker-*.err); sync.mode=checkpoint avoids the process group."
                        ) from exc
                    for i, actor, death in dead:
                        self._restart(i, actor, death)
                    logger.warning("weight push of version %d: repeating it after restarting replica(s) %s (%s)",
                                   version, [i for i, _, _ in dead], type(exc).__name__)
        return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(nbytes)}

    def _push(self, policy: torch.nn.Module, version: int) -> int:
        if self.mode == "checkpoint":
            assert self._folder is not None
            nbytes = save_weights(policy, self._folder, self._dtype, self._staging)
            self._latest_version = version
            path = str(self._folder / WEIGHTS_FILE)
            refs = [a.load_checkpoint.remote(path, version) for a in self.actors]
            for i, ref in enumerate(refs):
                self.versions[i] = self._wait(ref, i, f"load policy version {version} from {path}", self.timeout_s)
            return nbytes * self.num_replicas
        # broadcast: keep a host copy first, so that a replica restarted later gets exactly this version
        buckets = list(iter_weight_buckets(policy, self.cfg.sync.bucket_mb, self._dtype))
        self._snapshot = {name: t.to("cpu", copy=True) for bucket in buckets for name, t in bucket}
        self._latest_version = version
        if self._group is None:
            self._form_group()
        specs = [(name, list(t.shape), dtype_name(t.dtype)) for bucket in buckets for name, t in bucket]
        received = [a.receive_broadcast.remote(specs, version) for a in self.actors]
        nbytes = 0
        for bucket in buckets:
            for _, tensor in bucket:
                self._group.broadcast(tensor.contiguous())
                nbytes += tensor.numel() * tensor.element_size()
        for i, ref in enumerate(received):
            self._wait(ref, i, f"receive policy version {version} ({self.backend} broadcast)", self.collective_timeout_s,
                       "sync.collective_timeout_s")
        applied = [a.apply_received.remote() for a in self.actors]
        for i, ref in enumerate(applied):
            self.versions[i] = self._wait(ref, i, f"load policy version {version}", self.timeout_s)
        return nbytes * self.num_replicas

    def _form_group(self) -> None:
        address, world = self.cfg.sync.master_address, self.num_replicas + 1
        store = master_store(address, self.cfg.sync.master_port, world, self.collective_timeout_s)
        port = store.port  # the configured one, or one the OS chose (sync.master_port=0)
        name = f"posttrain-replicas-{uuid.uuid4().hex[:8]}"
        joined = [a.join_weight_group.remote(address, port, i + 1, world, name, self.backend, self.collective_timeout_s)
                  for i, a in enumerate(self.actors)]
        try:
            self._group = WeightGroup(address, port, 0, world, name, self.backend, self.collective_timeout_s, store=store)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or DistError subclasses
            late = [i for i, ref in enumerate(joined) if not self.ray.wait([ref], timeout=0)[0]]
            raise ReplicaError(
                f"Weight sync: engine replica(s) {late or 'all'} did not join the {self.backend} group '{name}' on "
                f"{address}:{port} within sync.collective_timeout_s={self.collective_timeout_s:g}s "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Set sync.master_address to "
                "an address of this machine the replicas' nodes can reach, or use sync.mode=checkpoint."
            ) from None
        for i, ref in enumerate(joined):
            self._wait(ref, i, f"join the {self.backend} weight group", self.collective_timeout_s, "sync.collective_timeout_s")
        logger.info("weight sync: %s group '%s' of the trainer and %d replica(s) formed", self.backend, name,
                    self.num_replicas)

    def _close_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _find_dead(self) -> list[tuple[int, Any, BaseException]]:
        """The replicas that do not answer ``info`` because their actor died (a failed push)."""
        self._close_group()  # a broken collective leaves the group unusable for everyone
        refs = [(i, a, a.info.remote()) for i, a in enumerate(self.actors)]
        dead = []
        for i, actor, ref in refs:
            try:
                self.ray.get(ref, timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001
                if self._dead(exc):
                    dead.append((i, actor, exc))
        return dead

    # -- the rest of the protocol --------------------------------------------------------------

    def checksums(self) -> list[str]:
        """Each replica's ``weights_checksum`` (tests and debugging: equal to the trainer's after a push)."""
        return [self._wait(a.weights_checksum.remote(), i, "checksum its weights", self.timeout_s)
                for i, a in enumerate(self.actors)]

    def info(self) -> list[dict]:
        return [self._wait(a.info.remote(), i, "answer info()", self.timeout_s) for i, a in enumerate(self.actors)]

    def metrics(self) -> dict[str, float]:
        return {"rollout/replica_restarts": float(sum(self.restarts)),
                "rollout/replica_version_min": float(min(self.versions))}

    def close(self) -> None:
        self._close_group()
        closing = [actor.close.remote() for actor in self.actors]
        if closing:
            self.ray.wait(closing, num_returns=len(closing), timeout=10)  # a dead or hung actor is killed anyway
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self._folder is not None and not self.cfg.sync.checkpoint_dir:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.owns_ray = False
