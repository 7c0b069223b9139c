"""Reward worker pool: environments run in separate processes with a per-sample timeout.

Each worker builds the environment (with ``env.tasks``: every task's environment) once and then
scores one sample per job, routed to its task's environment, so a sample whose
reward hangs (a pathological sympy expression) or crashes the interpreter costs only that
sample: it gets reward 0, its worker is killed and replaced, and the batch completes.

Every worker has its own pipe (not a shared queue) so the parent always knows which job a
worker holds and since when, and killing a worker can never leave a shared lock held. The
worker process itself is in ``worker.py``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

import torch

from posttrain.envs.base import Environment, MessageLog
from posttrain.envs.registry import SINGLE_TASK, env_specs
from posttrain.envs.worker import EnvSpecs, _Worker, build_envs, exception_text, failed, score_one, traceback_text
from posttrain.errors import ConfigError, PosttrainError

logger = logging.getLogger("posttrain.envs")

_MAX_START_FAILURES = 3  # replacement workers failing to start in a row before giving up


@dataclass
class ScoredBatch:
    """Rewards of N samples, in input order.

    rewards: (N,) float32. terminateds: (N,) bool. errors[i] is None for a sample scored normally,
    else why it got reward 0 (timeout, worker crash, or the exception env.step raised).
    """

    rewards: torch.Tensor
    metadata: list[dict[str, Any]]
    answers: list[str | None]
    observations: list[dict[str, Any]]
    terminateds: torch.Tensor
    next_stop_strings: list[list[str] | None]
    errors: list[str | None] = field(default_factory=list)
    num_timeouts: int = 0
    num_crashes: int = 0

    @property
    def num_errors(self) -> int:
        return sum(e is not None for e in self.errors)


_live_pools: weakref.WeakSet[RewardPool] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    # A pool left open (an exception, Ctrl-C outside a `with`) must not leave orphan workers.
    for pool in list(_live_pools):
        pool.close()


class RewardPool:
    """Scores samples with ``num_workers`` environment processes and a per-sample timeout.

    ``num_workers=0`` is a debugging mode: the environment runs in this process (breakpoints and
    tracebacks work), without timeouts or crash isolation. Use it as a context manager, or call
    close(). Not thread-safe: call score() from one thread.

    env_cls / env_kwargs: as ``env.cls`` / ``env.kwargs`` (checked here, before any worker starts).
    timeout_s: per-sample limit, counted from when the sample is handed to a worker.
    startup_timeout_s: limit for the workers to build their environments.
    tasks: as ``env.tasks``: task name -> ``{"cls": ..., "kwargs": {...}}``. When set, one pool
        serves every task (env_cls / env_kwargs are not used): each worker builds every task's
        environment once, and each sample is scored by the environment named by its
        ``metadata["task"]``; post_process reports metrics per task, as ``<task>/<name>``.
    """

    def __init__(
        self,
        env_cls: str,
        env_kwargs: dict[str, Any],
        num_workers: int,
        timeout_s: float,
        startup_timeout_s: float = 120.0,
        tasks: Mapping[str, Any] | None = None,
    ) -> None:
        if num_workers < 0 or timeout_s <= 0:
            raise ConfigError(
                f"reward pool needs env.num_workers >= 0 and env.timeout_s > 0 "
                f"(got {num_workers} and {timeout_s})."
            )
        self.env_cls = env_cls
        self.env_kwargs = dict(env_kwargs)
        # Resolve here first: a typo gives a clean ConfigError rather than a worker traceback.
        self.specs: EnvSpecs = env_specs(env_cls, env_kwargs, tasks)
        self.multi_task = SINGLE_TASK not in self.specs
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._closed = False
        self._local_envs: dict[str, Environment] | None = None
        self._workers: list[_Worker] = []
        self._next_job_id = 0
        self._start_failures = 0
        self._ctx = mp.get_context("spawn")  # fork is unsafe beside torch's threads
        _live_pools.add(self)
        if num_workers == 0:
            self._local_envs = build_envs(self.specs)
            return
        try:
            self._workers = [self._spawn() for _ in range(num_workers)]
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    @property
    def task_names(self) -> list[str]:
        """The configured tasks (empty for a single-environment pool)."""
        return list(self.specs) if self.multi_task else []

    def _building(self) -> str:
        """What the workers build, for messages."""
        if not self.multi_task:
            return repr(self.env_cls)
        return ", ".join(f"{task}: {cls!r}" for task, (cls, _) in self.specs.items())

    def _task_of(self, metadata: dict[str, Any]) -> str:
        return metadata.get("task") if self.multi_task else SINGLE_TASK  # type: ignore[return-value]

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.specs)

    def _wait_until_ready(self) -> None:
        """Block until every worker has built its environment; raise on the first failure."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(w.ready for w in self._workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PosttrainError(
                    f"reward workers did not start within {self.startup_timeout_s:g} s (building "
                    f"{self._building()}). Check that the environment's constructor does not block."
                )
            pending = [w for w in self._workers if not w.ready]
            wait([w.conn for w in pending] + [w.process.sentinel for w in pending], timeout=min(remaining, 1.0))
            for w in pending:
                message = self._poll(w)
                if message is None and not w.process.is_alive():
                    w.process.join(timeout=1.0)
                    raise PosttrainError(
                        f"a reward worker exited with code {w.process.exitcode} before it was ready "
                        f"(building {self._building()}); its error output above says why. Workers are "
                        "started with 'spawn', so the main script must be importable and guard its "
                        "entry point with `if __name__ == '__main__':`."
                    )
                if message is not None and message[0] == "init_error":
                    raise PosttrainError(
                        f"building environment {self._building()} with kwargs "
                        f"{ {t: kw for t, (_, kw) in self.specs.items()} if self.multi_task else self.env_kwargs} "
                        f"failed in a reward worker:\n{message[1]}"
                    )
                if message is not None and message[0] == "ready":
                    w.ready = True

    @staticmethod
    def _poll(w: _Worker) -> tuple | None:
        """The worker's next message if one is waiting, else None (also on a closed pipe)."""
        try:
            return w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        """Stop all workers (idempotent; bounded: terminate, join with timeout, kill)."""
        if self._closed:
            return
        self._closed = True
        _live_pools.discard(self)
        asked = []
        for w in self._workers:
            try:
                if w.process.is_alive() and w.ready and w.job is None:
                    w.conn.send(None)  # idle workers exit at once; the others are terminated below
                    asked.append(w)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for w in asked:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, message_logs: list[MessageLog], metadata: list[dict[str, Any]]) -> ScoredBatch:
        """Score N conversations (one job per sample); results keep the input order."""
        if self._closed:
            raise PosttrainError("RewardPool.score() called after close(); create a new pool.")
        if len(message_logs) != len(metadata):
            raise ValueError(f"{len(message_logs)} message logs but {len(metadata)} metadata entries")
        if self.num_workers == 0:
            results = [self._score_local(log, meta) for log, meta in zip(message_logs, metadata)]
        else:
            results = self._score_remote(message_logs, metadata)
        if self.multi_task:  # post_process routes by the scored metadata: keep each row's task there
            for r, meta in zip(results, metadata):
                if isinstance(r["metadata"], dict) and "task" in meta:
                    r["metadata"].setdefault("task", meta["task"])
        return self._assemble(results)

    def _score_local(self, message_log: MessageLog, metadata: dict[str, Any]) -> dict[str, Any]:
        assert self._local_envs is not None
        try:
            return score_one(self._local_envs, self._task_of(metadata), message_log, metadata)
        except Exception as e:
            logger.debug("reward raised:\n%s", traceback_text())  # bounded: user code's message may be huge
            return failed(metadata, exception_text(e))

    def _score_remote(self, message_logs: list[MessageLog], metadata: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for w in [w for w in self._workers if w.job is not None]:
            self._replace(w, None)  # still busy from a batch interrupted by an exception (Ctrl-C)
        results: list[dict[str, Any] | None] = [None] * len(message_logs)
        todo = list(range(len(message_logs)))[::-1]  # popped from the end: sample 0 goes first
        while todo or any(w.job is not None for w in self._workers):
            self._dispatch(todo, message_logs, metadata, results)
            # Sleep until a message, a death, or the earliest job deadline (bounded: never hangs).
            deadlines = [w.job_started_at + self.timeout_s for w in self._workers if w.job is not None]
            wait_s = min([0.5] + [max(0.0, d - time.monotonic()) for d in deadlines])
            wait([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers], timeout=wait_s)
            for w in list(self._workers):
                self._check(w, metadata, results)
        return results  # type: ignore[return-value]

    def _dispatch(self, todo: list[int], message_logs: list[MessageLog], metadata: list[dict[str, Any]],
                  results: list[dict[str, Any] | None]) -> None:
        """Send the next samples to idle, ready workers; the job's clock starts now."""
        for w in self._workers:
            if not (todo and w.ready and w.job is None and w.process.is_alive()):
                continue
            i = todo.pop()
            self._next_job_id += 1
            try:
                w.conn.send((self._next_job_id, message_logs[i], metadata[i], self._task_of(metadata[i])))
            except (OSError, ValueError):
                todo.append(i)  # the worker died just now: _check replaces it
                continue
            except Exception as e:  # the sample itself cannot be pickled
                results[i] = failed(metadata[i], f"sample cannot be sent to a reward worker: {e}")
                continue
            w.job, w.job_started_at = (self._next_job_id, i), time.monotonic()

    def _check(self, w: _Worker, metadata: list[dict[str, Any]], results: list[dict[str, Any] | None]) -> None:
        """Read a worker's messages, then handle its death, its job's timeout, or a slow start."""

        def fail(message: str, kind: str) -> None:
            i = w.job[1]  # type: ignore[index]
            results[i], w.job = failed(metadata[i], message, kind), None

        while (message := self._poll(w)) is not None:
            if message[0] == "ready":
                w.ready, self._start_failures = True, 0
            elif message[0] == "init_error":
                return self._replace(w, f"a replacement reward worker failed to start:\n{message[1]}")
            elif w.job is not None and message[1] == w.job[0]:  # "result" / "error" of its job
                if message[0] == "result":
                    results[w.job[1]], w.job = message[2], None
                else:
                    logger.debug("reward raised in a worker:\n%s", message[3])
                    fail(message[2], "error")
        if not w.process.is_alive():
            w.process.join(timeout=1.0)
            code = w.process.exitcode
            if w.job is not None:
                fail(f"reward worker crashed (exit code {code})", "crash")
            self._replace(w, None if w.ready else f"a replacement reward worker exited with code {code} while starting")
        elif w.job is not None and time.monotonic() - w.job_started_at > self.timeout_s:
            fail(f"reward timed out after {self.timeout_s:g} s", "timeout")
            self._replace(w, None)
        elif not w.ready and time.monotonic() - w.started_at > self.startup_timeout_s:
            self._replace(w, f"a replacement reward worker did not start within {self.startup_timeout_s:g} s")
        return None

    def _replace(self, w: _Worker, start_failure: str | None) -> None:
        """Kill a worker and start a new one; give up after repeated start-up failures."""
        w.stop(kill=True)
        self._workers.remove(w)
        self._count_start_failure(start_failure)
        self._workers.append(self._spawn())

    def _count_start_failure(self, start_failure: str | None, workers: str = "reward workers") -> None:
        """Count a replacement that failed to start (None: the replacement is for another reason);
        after _MAX_START_FAILURES in a row, stop with the last one's error."""
        if start_failure is None:
            return
        self._start_failures += 1
        logger.warning("%s", start_failure)
        if self._start_failures >= _MAX_START_FAILURES:
            raise PosttrainError(f"{workers} failed to start {self._start_failures} times in a row; last "
                                 f"error: {start_failure}")

    def _assemble(self, results: list[dict[str, Any]]) -> ScoredBatch:
        kinds = [r.get("error_kind") for r in results]
        errors = [r.get("error") for r in results]
        batch = ScoredBatch(
            rewards=torch.tensor([r["reward"] for r in results], dtype=torch.float32),
            metadata=[r["metadata"] for r in results],
            answers=[r["answer"] for r in results],
            observations=[r["observation"] for r in results],
            terminateds=torch.tensor([r["terminated"] for r in results], dtype=torch.bool),
            next_stop_strings=[r["next_stop_strings"] for r in results],
            errors=errors,
            num_timeouts=kinds.count("timeout"),
            num_crashes=kinds.count("crash"),
        )
        if batch.num_errors:
            first = next(i for i, e in enumerate(errors) if e is not None)
            logger.warning(
                "rewards of %d of %d samples failed and were set to 0 (%d timed out, %d crashed their "
                "worker, %d raised); first, sample %d: %s",
                batch.num_errors, len(results), batch.num_timeouts, batch.num_crashes,
                batch.num_errors - batch.num_timeouts - batch.num_crashes, first, errors[first],
            )
        return batch

    def post_process(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """The environments' global_post_process_and_metrics, run in this process.

        Single environment: its own call on the whole batch, metrics unchanged. Several tasks: each
        task's environment gets the sub-batch of its rows (every tensor or list of the batch's
        length is sliced), its metrics are returned as ``<task>/<name>``, and the returned batch
        holds the sub-batches' values put back in place.
        """
        if self._local_envs is None:
            self._local_envs = build_envs(self.specs)  # lazily: only the trainer needs these
        if not self.multi_task:
            return self._local_envs[SINGLE_TASK].global_post_process_and_metrics(batch)
        n = len(batch["rewards"])
        rows_by_task: dict[str, list[int]] = {}
        for i, meta in enumerate(batch["metadata"]):
            rows_by_task.setdefault(meta.get("task") if isinstance(meta, Mapping) else None, []).append(i)
        per_row = [k for k, v in batch.items() if isinstance(v, (list, torch.Tensor)) and len(v) == n]
        out = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) if k in per_row else v for k, v in batch.items()}
        metrics: dict[str, float] = {}
        for task, rows in rows_by_task.items():
            env = self._local_envs.get(task)  # type: ignore[arg-type]
            if env is None:
                continue  # rows the pool could not score (unknown task) have no environment's metrics
            index = torch.tensor(rows, dtype=torch.long)
            sub = {k: (batch[k][index] if isinstance(batch[k], torch.Tensor) else [batch[k][i] for i in rows])
                   for k in per_row}
            sub_out, task_metrics = env.global_post_process_and_metrics({**batch, **sub})
            metrics.update({f"{task}/{k}": v for k, v in task_metrics.items()})
            for k in per_row:
                value = sub_out.get(k)
                if isinstance(out[k], torch.Tensor) and isinstance(value, torch.Tensor) and len(value) == len(rows):
                    out[k][index] = value.to(out[k].dtype)
                elif isinstance(out[k], list) and isinstance(value, list) and len(value) == len(rows):
                    for i, v in zip(rows, value):
                        out[k][i] = v
        return out, metrics
