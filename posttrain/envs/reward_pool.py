"""Reward worker pool: environments run in separate processes with a per-sample timeout.

Each worker builds the environment once and then scores one sample per job, so a sample whose
reward hangs (a pathological sympy expression) or crashes the interpreter costs only that
sample: it gets reward 0, its worker is killed and replaced, and the batch completes.

Every worker has its own pipe (not a shared queue) so the parent always knows which job a
worker holds and since when, and killing a worker can never leave a shared lock held.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.envs.registry import check_env_kwargs, resolve_env_class
from posttrain.errors import ConfigError, PosttrainError

logger = logging.getLogger("posttrain.envs")

_POLL_S = 1.0  # how often an idle worker checks that its parent is still alive
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


def _unpack_single(ret: EnvironmentReturn, metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain-Python result of a 1-sample step (plain data pickles safely over a pipe)."""
    if len(ret.rewards) != 1:
        raise ValueError(f"env.step returned {len(ret.rewards)} rewards for a batch of 1 sample")
    meta = ret.metadata[0] if ret.metadata and ret.metadata[0] is not None else dict(metadata)
    stops = ret.next_stop_strings[0] if ret.next_stop_strings else None
    return {
        "reward": float(ret.rewards[0]),
        "terminated": bool(ret.terminateds[0]),
        "observation": ret.observations[0],
        "metadata": meta,
        "answer": ret.answers[0] if ret.answers else None,
        "next_stop_strings": stops,
    }


def _failed(metadata: dict[str, Any] | None, message: str, kind: str = "error") -> dict[str, Any]:
    """Result of a sample whose reward could not be computed: reward 0, episode over.
    kind: 'timeout', 'crash' or 'error' (env.step raised)."""
    meta = {**(metadata or {}), "correct": False, "formatted": False, "reward_error": message}
    return {
        "reward": 0.0,
        "terminated": True,
        "observation": {"role": "environment", "content": f"error: {message}"},
        "metadata": meta,
        "answer": None,
        "next_stop_strings": None,
        "error": message,
        "error_kind": kind,
    }


def _exception_text(e: BaseException) -> str:
    return f"reward raised {type(e).__name__}: {e}"


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker when the trainer dies, even while a sample runs forever."""
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(env_cls: str, env_kwargs: dict[str, Any], conn: Connection, parent_pid: int) -> None:
    """Worker process: build the environment, then score jobs until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        env = resolve_env_class(env_cls)(**env_kwargs)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            if not conn.poll(_POLL_S):
                continue
            job = conn.recv()
        except (EOFError, OSError):
            job = None  # the parent closed the pipe or died
        if job is None:
            # Skip interpreter finalization (about 0.5 s with torch loaded): nothing to clean up.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        job_id, message_log, metadata = job
        try:
            result = _unpack_single(env.step([message_log], [metadata]), metadata)
            conn.send(("result", job_id, result))
        except Exception as e:
            conn.send(("error", job_id, _exception_text(e), traceback.format_exc()))


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, ctx: Any, env_cls: str, env_kwargs: dict[str, Any]) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        # daemon: multiprocessing's own exit handler terminates it if close() never ran.
        self.process = ctx.Process(
            target=_worker_main, args=(env_cls, env_kwargs, child_conn, os.getpid()), daemon=True,
            name="posttrain-reward-worker",
        )
        self.process.start()
        child_conn.close()  # the child holds its own copy; closing ours lets it see EOF if we die
        self.started_at = time.monotonic()
        self.ready = False
        self.job: tuple[int, int] | None = None  # (job_id, sample index)
        self.job_started_at = 0.0

    def stop(self, kill: bool = False) -> None:
        """Stop the process (SIGKILL when kill, else SIGTERM, then SIGKILL if needed) and reap it."""
        for signal_it in ((self.process.kill,) if kill else (self.process.terminate, self.process.kill)):
            if self.process.is_alive():
                signal_it()
                self.process.join(timeout=2.0)
        self.conn.close()


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
    """

    def __init__(
        self,
        env_cls: str,
        env_kwargs: dict[str, Any],
        num_workers: int,
        timeout_s: float,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 0 or timeout_s <= 0:
            raise ConfigError(
                f"reward pool needs env.num_workers >= 0 and env.timeout_s > 0 "
                f"(got {num_workers} and {timeout_s})."
            )
        self.env_cls = env_cls
        self.env_kwargs = dict(env_kwargs)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._closed = False
        self._local_env: Environment | None = None
        self._workers: list[_Worker] = []
        self._next_job_id = 0
        self._start_failures = 0
        self._ctx = mp.get_context("spawn")  # fork is unsafe beside torch's threads
        # Resolve here first: a typo gives a clean ConfigError rather than a worker traceback.
        check_env_kwargs(resolve_env_class(env_cls), self.env_kwargs)
        _live_pools.add(self)
        if num_workers == 0:
            self._local_env = self._build_local_env()
            return
        try:
            self._workers = [self._spawn() for _ in range(num_workers)]
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    def _build_local_env(self) -> Environment:
        return resolve_env_class(self.env_cls)(**self.env_kwargs)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.env_cls, self.env_kwargs)

    def _wait_until_ready(self) -> None:
        """Block until every worker has built its environment; raise on the first failure."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(w.ready for w in self._workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PosttrainError(
                    f"reward workers did not start within {self.startup_timeout_s:g} s (building "
                    f"{self.env_cls!r}). Check that the environment's constructor does not block."
                )
            pending = [w for w in self._workers if not w.ready]
            wait([w.conn for w in pending] + [w.process.sentinel for w in pending], timeout=min(remaining, 1.0))
            for w in pending:
                message = self._poll(w)
                if message is None and not w.process.is_alive():
                    w.process.join(timeout=1.0)
                    raise PosttrainError(
                        f"a reward worker exited with code {w.process.exitcode} before it was ready "
                        f"(building {self.env_cls!r}); its error output above says why. Workers are "
                        "started with 'spawn', so the main script must be importable and guard its "
                        "entry point with `if __name__ == '__main__':`."
                    )
                if message is not None and message[0] == "init_error":
                    raise PosttrainError(
                        f"building environment {self.env_cls!r} with kwargs {self.env_kwargs} failed in a "
                        f"reward worker:\n{message[1]}"
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
        return self._assemble(results)

    def _score_local(self, message_log: MessageLog, metadata: dict[str, Any]) -> dict[str, Any]:
        assert self._local_env is not None
        try:
            return _unpack_single(self._local_env.step([message_log], [metadata]), metadata)
        except Exception as e:
            logger.debug("reward raised", exc_info=True)
            return _failed(metadata, _exception_text(e))

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
                w.conn.send((self._next_job_id, message_logs[i], metadata[i]))
            except (OSError, ValueError):
                todo.append(i)  # the worker died just now: _check replaces it
                continue
            except Exception as e:  # the sample itself cannot be pickled
                results[i] = _failed(metadata[i], f"sample cannot be sent to a reward worker: {e}")
                continue
            w.job, w.job_started_at = (self._next_job_id, i), time.monotonic()

    def _check(self, w: _Worker, metadata: list[dict[str, Any]], results: list[dict[str, Any] | None]) -> None:
        """Read a worker's messages, then handle its death, its job's timeout, or a slow start."""

        def fail(message: str, kind: str) -> None:
            i = w.job[1]  # type: ignore[index]
            results[i], w.job = _failed(metadata[i], message, kind), None

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
        if start_failure is not None:
            self._start_failures += 1
            logger.warning("%s", start_failure)
            if self._start_failures >= _MAX_START_FAILURES:
                raise PosttrainError(
                    f"reward workers failed to start {self._start_failures} times in a row; last "
                    f"error: {start_failure}"
                )
        self._workers.append(self._spawn())

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
        """The environment's global_post_process_and_metrics, run in this process."""
        if self._local_env is None:
            self._local_env = self._build_local_env()  # lazily: only the trainer needs this one
        return self._local_env.global_post_process_and_metrics(batch)
