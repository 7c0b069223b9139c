"""Engine replicas in their own processes on this machine (``cluster.backend=process``).

Each replica is a child process (started with ``spawn``) that loads its own copy of the policy and
runs an :class:`~posttrain.cluster.replicas.EngineReplica`. Generation and weights travel over
two pipes per replica, so a weight update can reach a replica while it generates (partial
rollouts): the producer thread generates over one, the trainer pushes over the other.

Unlike the in-process replicas of ``cluster.backend=local`` (threads), a replica here shares no
Python interpreter with the trainer: its scheduler, sampler and host work never wait for the
trainer's GIL, and a replica that crashes (a segfault, an OOM kill) does not take the trainer
with it. It is restarted with the last pushed weights and generates its share again (same seed),
up to ``cluster.max_replica_restarts`` times; the error after that names the exit code or signal
and the last lines of the replica's log.

Weights move as one flat buffer per dtype: in shared memory on a CPU, as a CUDA IPC handle on a
GPU (torch.multiprocessing's pickling), copied by the replica into its parameters before the push
returns. The last pushed buffers are kept for restarts (one copy of the weights).
"""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from posttrain.cluster.replicas import EngineReplica, ReplicaError, split_contiguous, unwrap_policy
from posttrain.models.weights import iter_weight_buckets, weights_checksum
from posttrain.sampling import Completion, SamplingParams

logger = logging.getLogger("posttrain.rollout")

LOG_TAIL_LINES = 20


def flatten_weights(model: torch.nn.Module) -> tuple[list[tuple[str, list[int], str, int]], dict[str, torch.Tensor]]:
    """``(specs, buffers)``: every parameter (each tied weight once) copied into one flat buffer
    per dtype; ``specs`` holds ``(name, shape, dtype name, offset)`` to take them out again."""
    named = [item for bucket in iter_weight_buckets(unwrap_policy(model), float("inf")) for item in bucket]
    sizes: dict[str, int] = {}
    specs = []
    for name, tensor in named:
        dtype = str(tensor.dtype).removeprefix("torch.")
        specs.append((name, list(tensor.shape), dtype, sizes.get(dtype, 0)))
        sizes[dtype] = sizes.get(dtype, 0) + tensor.numel()
    device = named[0][1].device if named else torch.device("cpu")
    buffers = {dtype: torch.empty(size, dtype=getattr(torch, dtype), device=device) for dtype, size in sizes.items()}
    with torch.no_grad():
        for (name, tensor), (_, _, dtype, offset) in zip(named, specs):
            buffers[dtype][offset: offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
    return specs, buffers


def unflatten_weights(specs: list[tuple[str, list[int], str, int]],
                      buffers: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of :func:`flatten_weights`, as views of ``buffers``."""
    return [(name, buffers[dtype][offset: offset + math.prod(shape)].view(shape)) for name, shape, dtype, offset in specs]


def _serve(conn: Connection, handle: Any, lock: threading.Lock) -> None:
    """Answer requests on ``conn`` until it closes: ``(name, args)`` -> ``("ok", result)`` or
    ``("error", traceback text)``; ``close`` answers and stops."""
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = handle(name, *args)
            reply = ("ok", result)
        except BaseException:  # noqa: BLE001 - the parent gets the replica's traceback, not a dead pipe
            reply = ("error", traceback.format_exc())
        with lock:
            conn.send(reply)
        if name == "close":
            return


def replica_main(cfg: Any, replica_id: int, version: int, device: str | None, generate_conn: Connection,
                 weights_conn: Connection, log_path: str) -> None:
    """A replica process: load the policy, then serve generation on one pipe (a thread) and weights,
    info and close on the other (the main thread)."""
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format=f"%(asctime)s replica {replica_id} %(levelname)s %(name)s: %(message)s")
    # The trainer handles Ctrl-C and SIGTERM and closes its replicas; they must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        replica = EngineReplica.from_config(cfg, replica_id, version=version, device=device)
    except BaseException:  # noqa: BLE001
        weights_conn.send(("error", traceback.format_exc()))
        return
    weights_conn.send(("ok", replica.info()))
    lock = threading.Lock()

    def handle(name: str, *args: Any) -> Any:
        if name == "generate":
            return replica.generate(*args)
        if name == "load":
            specs, buffers, new_version = args
            replica.load_weights(unflatten_weights(specs, buffers), new_version)
            return replica.version
        if name == "info":
            return replica.info()
        if name == "checksum":
            return weights_checksum(replica.model)
        if name == "close":
            replica.close()
            return None
        raise ValueError(f"unknown request {name!r}")

    threading.Thread(target=_serve, args=(generate_conn, handle, threading.Lock()), daemon=True,
                     name="posttrain-replica-generate").start()
    _serve(weights_conn, handle, lock)


class _Replica:
    """The parent's handle of one replica process."""

    def __init__(self, ctx: Any, cfg: Any, replica_id: int, version: int, device: str | None, log_dir: Path) -> None:
        self.replica_id = replica_id
        self.log_path = log_dir / f"replica_{replica_id}.log"
        self.generate_conn, child_generate = ctx.Pipe()
        self.weights_conn, child_weights = ctx.Pipe()
        self.process = ctx.Process(target=replica_main, name=f"posttrain-replica-{replica_id}", daemon=True,
                                   args=(cfg, replica_id, version, device, child_generate, child_weights,
                                         str(self.log_path)))
        self.process.start()
        child_generate.close()
        child_weights.close()
        self.started = time.monotonic()

    def describe_death(self) -> str:
        """How the process ended (exit code or signal) and the end of its log."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is None:
            how = "is alive but does not answer"
        elif code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}" + (
                " (SIGKILL: often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        return f"engine replica {self.replica_id} (pid {self.process.pid}) {how}" + (
            f"; the last lines of {self.log_path}:\n  " + "\n  ".join(tail) if tail else "")

    def kill(self) -> None:
        for conn in (self.generate_conn, self.weights_conn):
            conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


class _Died(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class ProcessReplicaPool:
    """``rollout.num_replicas`` replica processes; the ReplicaPool protocol of ``posttrain.cluster.replicas``
    (``generate``, ``push_weights``, ``metrics``, ``close``, ``num_replicas``)."""

    def __init__(self, cfg: Any, start_version: int, model: torch.nn.Module | None = None) -> None:
        self.cfg = cfg
        self.num_replicas = cfg.rollout.num_replicas
        self.timeout_s = float(cfg.cluster.wait_timeout_s)
        self.max_restarts = cfg.cluster.max_replica_restarts
        self.restarts = [0] * self.num_replicas
        self._ctx = torch_mp.get_context("spawn")
        self._log_dir = Path(tempfile.mkdtemp(prefix="posttrain-replicas-"))
        # Replicas on the trainer's device: a GPU policy gets GPU replicas beside it.
        self._device = str(next(model.parameters()).device) if model is not None else None
        self._latest: tuple[list, dict[str, torch.Tensor], int] | None = None  # the last push, for restarts
        self._version = start_version
        self._push_lock = threading.Lock()  # a restart reloads the weights; one load at a time per pool
        # One generation at a time: the producer thread and validation (the trainer's thread) share
        # each replica's generate pipe, whose answers must go back to the call that asked.
        self._generate_lock = threading.Lock()
        self.replicas: list[_Replica] = []
        try:
            self.replicas = [self._start(i, start_version) for i in range(self.num_replicas)]
            for i in range(self.num_replicas):
                self._await_ready(i)
            logger.info("Engine replicas: %d process(es) on %s, logs in %s", self.num_replicas, self._device or "cpu",
                        self._log_dir)
            if model is not None:  # the trainer's weights as they are (a resumed run's), not the files'
                self.push_weights(model, start_version)
        except BaseException:
            self.close()
            raise

    # ---- lifecycle
    def _start(self, i: int, version: int) -> _Replica:
        return _Replica(self._ctx, self.cfg, i, version, self._device, self._log_dir)

    def _await_ready(self, i: int) -> None:
        try:
            status, value = self._call(i, "weights", None, "start (load the model)")
        except _Died:
            raise ReplicaError(f"{self.replicas[i].describe_death()}\n(while starting: loading the model)") from None
        if status == "error":
            raise ReplicaError(f"engine replica {i} failed to start:\n{value}")

    def _restart(self, i: int) -> None:
        """Replace dead replica ``i`` with a fresh process holding the last pushed weights."""
        death = self.replicas[i].describe_death()
        self.restarts[i] += 1
        if self.restarts[i] > self.max_restarts:
            raise ReplicaError(f"{death}\nIt died {self.restarts[i]} times, more than cluster.max_replica_restarts="
                               f"{self.max_restarts}; fix the cause above or raise cluster.max_replica_restarts.")
        logger.warning("%s; restarting it (%d of %d allowed)", death.splitlines()[0], self.restarts[i],
                       self.max_restarts)
        self.replicas[i].kill()
        self.replicas[i] = self._start(i, self._version)
        self._await_ready(i)
        if self._latest is not None:
            specs, buffers, version = self._latest
            status, value = self._call(i, "weights", ("load", (specs, buffers, version)),
                                       f"load policy version {version} after its restart")
            if status == "error":
                raise ReplicaError(f"engine replica {i} failed to load policy version {version}:\n{value}")

    def _call(self, i: int, pipe: str, request: tuple[str, tuple] | None, what: str) -> tuple[str, Any]:
        """Send ``request`` (None: only wait for a message) on replica ``i``'s ``pipe`` and wait for
        its answer; raises _Died when the process ended, ReplicaError after ``wait_timeout_s``."""
        replica = self.replicas[i]
        conn = replica.generate_conn if pipe == "generate" else replica.weights_conn
        try:
            if request is not None:
                conn.send(request)
            deadline = time.monotonic() + self.timeout_s
            while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not replica.process.is_alive():
                    raise _Died(i)
                if time.monotonic() >= deadline:
                    raise ReplicaError(f"engine replica {i} (pid {replica.process.pid}) did not {what} within "
                                       f"cluster.wait_timeout_s={self.timeout_s:g}s; its log: {replica.log_path}")
            return conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            raise _Died(i) from exc

    # ---- the ReplicaPool protocol
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """Contiguous chunks of ``prompts``, one per replica, generated concurrently; chunk ``i`` is
        seeded ``seed + i`` (one replica: exactly ``seed``). A chunk whose replica dies is generated
        again by the restarted replica, with the same seed. Calls from several threads take turns."""
        with self._generate_lock:
            return self._generate(prompts, params, seed)

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        chunks = {i: (start, end) for i, (start, end) in enumerate(split_contiguous(len(prompts), self.num_replicas))
                  if end > start}
        results: dict[int, list[list[Completion]]] = {}

        def send(i: int) -> None:
            start, end = chunks[i]
            try:
                self.replicas[i].generate_conn.send(("generate", (prompts[start:end], params, seed + i)))
            except (BrokenPipeError, OSError):
                pass  # found dead below

        for i in chunks:
            send(i)
        deadline = time.monotonic() + self.timeout_s
        while len(results) < len(chunks):
            waiting = {self.replicas[i].generate_conn: i for i in chunks if i not in results}
            ready = wait(list(waiting) + [self.replicas[i].process.sentinel for i in waiting.values()],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(waiting.values())
                raise ReplicaError(f"engine replica(s) {', '.join(map(str, late))} did not finish generating "
                                   f"{len(prompts)} prompts within cluster.wait_timeout_s={self.timeout_s:g}s; raise it "
                                   f"if generation is just slow (logs in {self._log_dir}).")
            for conn, i in waiting.items():
                try:
                    if conn.poll():
                        status, value = conn.recv()
                        if status == "error":
                            raise ReplicaError(f"engine replica {i} failed to generate:\n{value}")
                        results[i] = value
                        continue
                except (EOFError, OSError):
                    pass
                dead = self.replicas[i]
                if not dead.process.is_alive():
                    with self._push_lock:
                        if self.replicas[i] is dead:  # a weight push may have restarted it meanwhile
                            self._restart(i)
                    send(i)
                    deadline = time.monotonic() + self.timeout_s  # the restarted replica starts over
        return [group for i in sorted(results) for group in results[i]]

    def push_weights(self, model: torch.nn.Module, version: int) -> dict[str, float]:
        """The trainer policy's weights into every replica, as ``version``; returns once every
        replica holds them. A replica that died meanwhile is restarted (with these weights)."""
        start = time.perf_counter()
        specs, buffers = flatten_weights(model)
        nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
        with self._push_lock:
            self._latest, self._version = (specs, buffers, version), version
            for i in range(self.num_replicas):
                try:
                    status, value = self._call(i, "weights", ("load", (specs, buffers, version)),
                                               f"load policy version {version}")
                except _Died:
                    self._restart(i)  # the fresh replica loads self._latest
                    continue
                if status == "error":
                    raise ReplicaError(f"engine replica {i} failed to load policy version {version}:\n{value}")
        return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(nbytes * self.num_replicas)}

    def info(self) -> list[dict]:
        with self._push_lock:  # the weights pipe answers one caller at a time
            return [self._call(i, "weights", ("info", ()), "report its state")[1] for i in range(self.num_replicas)]

    def checksums(self) -> list[str]:
        """Each replica's ``weights_checksum`` (tests and debugging: equal to the trainer's after a push)."""
        with self._push_lock:
            return [self._call(i, "weights", ("checksum", ()), "checksum its weights")[1]
                    for i in range(self.num_replicas)]

    def metrics(self) -> dict[str, float]:
        return {"rollout/replica_restarts": float(sum(self.restarts)),
                "rollout/replica_version_min": float(self._version)}

    def close(self) -> None:
        for i, replica in enumerate(self.replicas):
            try:
                if replica.process.is_alive():
                    replica.weights_conn.send(("close", ()))
                    if replica.weights_conn.poll(10):
                        replica.weights_conn.recv()
            except (EOFError, OSError):
                pass
            replica.kill()
        logger.debug("engine replica processes closed (pids %s)", [r.process.pid for r in self.replicas])

    def pids(self) -> list[int]:
        return [r.process.pid for r in self.replicas if r.process.pid is not None]
