"""The reward pool as Ray actors (``cluster.backend=ray``): ``env.num_workers`` actors, each
building the environment(s) once and scoring one sample per call.

Same contract as :class:`~posttrain.envs.reward_pool.RewardPool` (it is a subclass: ``score``,
``post_process``, the context manager and ``close`` behave the same): a sample whose scoring takes
longer than ``env.timeout_s`` gets reward 0, its actor is killed (``ray.kill``) and replaced; an
actor that dies while scoring (a crash, an OOM kill, ``os._exit``) costs only its sample (reward 0,
the error names Ray's cause); replacements that fail to start repeatedly stop the run. The
scoring itself is ``posttrain.envs.worker``'s, so rewards equal the local pool's.

Actors get the trainer's ``sys.path`` entries that exist on their node (as the local pool's
spawned workers inherit it), so an environment class importable by the trainer is importable by
actors on the same machine; on other nodes its module must be installed there or shipped with a
Ray runtime_env.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from posttrain.cluster.ray_cluster import death_report, import_ray, init_ray
from posttrain.envs.base import MessageLog
from posttrain.envs.reward_pool import RewardPool
from posttrain.envs.worker import EnvSpecs, RewardWorkerActor, exception_text, failed
from posttrain.errors import PosttrainError, clip_text

logger = logging.getLogger("posttrain.envs")

_CAUSE_CHARS = 400  # of Ray's death cause in a sample's error (the log gets all of it and the stderr tail)


class _RayWorker:
    """Driver-side handle of one reward actor (slot ``index``: a replacement keeps it)."""

    def __init__(self, ray: Any, index: int, specs: EnvSpecs, num_cpus: float) -> None:
        self.ray = ray
        self.index = index
        actor_cls = ray.remote(RewardWorkerActor).options(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)
        self.actor = actor_cls.remote(specs, list(sys.path))
        self.ready_ref = self.actor.ready.remote()
        self.started_at = time.monotonic()
        self.ready = False
        self.pid: int | None = None
        self.job: tuple[Any, int] | None = None  # (object ref of the score call, sample index)
        self.job_started_at = 0.0

    @property
    def actor_id(self) -> str:
        return self.actor._actor_id.hex()

    def name(self) -> str:
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"reward worker {self.index} (Ray actor {self.actor_id[:12]}{pid})"

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # already dead, or Ray already shut down at exit
            self.ray.kill(self.actor, no_restart=True)


class RayRewardPool(RewardPool):
    """Scores samples with ``num_workers`` Ray actors and a per-sample timeout; see the module doc.

    cluster: ``cfg.cluster`` (address, namespace, cpus_per_reward_worker). startup_timeout_s: limit
    for the actors to be placed and to build their environments (default ``cluster.wait_timeout_s``).
    ``num_workers=0`` scores in this process, as the local pool does. Not thread-safe: call
    score() from one thread.
    """

    def __init__(
        self,
        env_cls: str,
        env_kwargs: dict[str, Any],
        num_workers: int,
        timeout_s: float,
        cluster: Any,
        startup_timeout_s: float | None = None,
        tasks: Mapping[str, Any] | None = None,
    ) -> None:
        self.ray = import_ray()
        self.num_cpus = float(cluster.cpus_per_reward_worker)
        self._next_index = 0  # slots of the actors: a replacement keeps its predecessor's
        self.owns_ray = init_ray(cluster)
        try:
            # RewardPool's constructor checks the settings and the environment, then calls
            # _spawn and _wait_until_ready below (and close() if they fail).
            super().__init__(env_cls, env_kwargs, num_workers, timeout_s,
                             startup_timeout_s=cluster.wait_timeout_s if startup_timeout_s is None else startup_timeout_s,
                             tasks=tasks)
        except BaseException:
            self._shutdown_ray()
            raise

    # -- actors ------------------------------------------------------------------------------------

    def _spawn(self, index: int | None = None) -> _RayWorker:  # type: ignore[override]
        if index is None:
            index, self._next_index = self._next_index, self._next_index + 1
        return _RayWorker(self.ray, index, self.specs, self.num_cpus)

    def _get(self, w: _RayWorker, ref: Any, what: str) -> Any:
        """``ray.get`` of a call of ``w`` known to be finished (ray.wait said so); the timeout names it."""
        try:
            return self.ray.get(ref, timeout=self.startup_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise PosttrainError(f"{w.name()} did not {what} within {self.startup_timeout_s:g} s.") from None

    def _dead(self, exc: BaseException) -> bool:
        e = self.ray.exceptions
        return isinstance(exc, (e.RayActorError, e.OutOfMemoryError, e.WorkerCrashedError))

    def _cause(self, w: _RayWorker, exc: BaseException) -> str:
        """Ray's reason for ``w``'s death, logged in full (with its stderr's end); the first part returned."""
        report = death_report(exc, w.pid, w.actor_id)
        logger.warning("%s died: %s", w.name(), report)
        return clip_text(report.splitlines()[0], _CAUSE_CHARS)

    def _not_started(self, late: list[_RayWorker]) -> str:
        return (f"{', '.join(w.name() for w in late)} did not start within {self.startup_timeout_s:g} s (building "
                f"{self._building()}). Each reserves cluster.cpus_per_reward_worker={self.num_cpus:g} CPU: if "
                "`ray status` shows none free, lower it or env.num_workers; else check that the environment's "
                "constructor does not block.")

    def _wait_until_ready(self) -> None:
        """Block until every actor has built its environment; raise on the first failure."""
        deadline = time.monotonic() + self.startup_timeout_s
        while pending := {w.ready_ref: w for w in self._workers if not w.ready}:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PosttrainError(self._not_started(list(pending.values())))
            done, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=min(remaining, 1.0))
            for ref in done:
                w = pending[ref]
                try:
                    w.pid, error = self._get(w, ref, "report that it started")
                except Exception as exc:
                    if not self._dead(exc):
                        raise
                    raise PosttrainError(f"{w.name()} died before it was ready (building {self._building()}): "
                                         f"{death_report(exc, w.pid, w.actor_id)}") from None
                if error is not None:
                    raise PosttrainError(
                        f"building environment {self._building()} with kwargs "
                        f"{ {t: kw for t, (_, kw) in self.specs.items()} if self.multi_task else self.env_kwargs} "
                        f"failed in {w.name()}:\n{error}"
                    )
                w.ready = True

    def _replace(self, w: _RayWorker, start_failure: str | None) -> None:  # type: ignore[override]
        """Kill an actor and start a new one in its slot; give up after repeated start-up failures."""
        w.stop()
        self._workers[self._workers.index(w)] = self._spawn(w.index)
        self._count_start_failure(start_failure, "reward workers (Ray actors)")

    def close(self) -> None:
        """Kill every actor (idempotent), and shut Ray down if this pool started it."""
        if self._closed:
            return
        for w in self._workers:
            w.stop()
        self._workers = []
        super().close()
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.owns_ray = False

    # -- scoring -------------------------------------------------------------------------------------

    def _score_remote(self, message_logs: list[MessageLog], metadata: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for w in [w for w in self._workers if w.job is not None]:
            self._replace(w, None)  # still busy from a batch interrupted by an exception (Ctrl-C)
        results: list[dict[str, Any] | None] = [None] * len(message_logs)
        todo = list(range(len(message_logs)))[::-1]  # popped from the end: sample 0 goes first
        while todo or any(w.job is not None for w in self._workers):
            self._dispatch(todo, message_logs, metadata, results)
            # Sleep until a result, a start, or the earliest deadline (bounded: never hangs).
            now = time.monotonic()
            refs = [w.job[0] for w in self._workers if w.job is not None]
            refs += [w.ready_ref for w in self._workers if not w.ready]
            deadlines = [w.job_started_at + self.timeout_s for w in self._workers if w.job is not None]
            deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
            wait_s = min([0.5] + [max(0.0, d - now) for d in deadlines])
            done: set[Any] = set()
            if refs:
                self.ray.wait(refs, num_returns=1, timeout=wait_s)
                done = set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0])
            else:
                time.sleep(wait_s)
            for w in list(self._workers):
                self._check(w, done, metadata, results)
        return results  # type: ignore[return-value]

    def _dispatch(self, todo: list[int], message_logs: list[MessageLog], metadata: list[dict[str, Any]],
                  results: list[dict[str, Any] | None]) -> None:
        """Hand the next samples to idle, ready actors (one each); the job's clock starts now."""
        for w in self._workers:
            if not (todo and w.ready and w.job is None):
                continue
            i = todo.pop()
            try:
                ref = w.actor.score.remote(message_logs[i], metadata[i], self._task_of(metadata[i]))
            except Exception as e:  # noqa: BLE001 - the sample itself cannot be serialized
                results[i] = failed(metadata[i], f"sample cannot be sent to a reward worker: {e}")
                continue
            w.job, w.job_started_at = (ref, i), time.monotonic()

    def _check(self, w: _RayWorker, done: set[Any], metadata: list[dict[str, Any]],  # type: ignore[override]
               results: list[dict[str, Any] | None]) -> None:
        """Take an actor's finished start or job, else handle its job's timeout or a slow start."""

        def fail(message: str, kind: str) -> None:
            i = w.job[1]  # type: ignore[index]
            results[i], w.job = failed(metadata[i], message, kind), None

        if not w.ready and w.ready_ref in done:
            try:
                w.pid, error = self._get(w, w.ready_ref, "report that it started")
            except Exception as exc:
                if not self._dead(exc):
                    raise
                return self._replace(w, f"a replacement {w.name()} died while starting: {self._cause(w, exc)}")
            if error is not None:
                return self._replace(w, f"a replacement {w.name()} failed to start:\n{error}")
            w.ready, self._start_failures = True, 0
        elif not w.ready and time.monotonic() - w.started_at > self.startup_timeout_s:
            return self._replace(w, f"a replacement {self._not_started([w])}")
        if w.job is not None and w.job[0] in done:
            try:
                message = self._get(w, w.job[0], "return a finished reward")
            except Exception as exc:  # noqa: BLE001 - a death, or Ray's own error about the result
                if self._dead(exc):
                    fail(f"reward worker crashed ({w.name()}: {self._cause(w, exc)})", "crash")
                    return self._replace(w, None)
                # not the environment's exception (the actor catches those): e.g. a result Ray cannot deserialize
                fail(exception_text(exc), "error")
                return None
            if message[0] == "result":
                results[w.job[1]], w.job = message[1], None
            else:
                logger.debug("reward raised in %s:\n%s", w.name(), message[2])
                fail(message[1], "error")
        elif w.job is not None and time.monotonic() - w.job_started_at > self.timeout_s:
            fail(f"reward timed out after {self.timeout_s:g} s ({w.name()}, killed and replaced)", "timeout")
            self._replace(w, None)
        return None
