"""The worker side of the reward pool: the process that builds the environments and scores one
sample per job, and the parent's handle of it (``_Worker``). See ``reward_pool.py`` for the
protocol's other end.

Messages over a worker's pipe (parent -> worker): ``(job_id, message_log, metadata, task)`` or
None (exit). Worker -> parent: ``("ready", None)``, ``("init_error", traceback)``,
``("result", job_id, result)``, ``("error", job_id, message, traceback)``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.envs.registry import resolve_env_class
from posttrain.errors import TRACEBACK_LIMIT, clip_text

_POLL_S = 1.0  # how often an idle worker checks that its parent is still alive

# task name -> (env.cls, env.kwargs)
EnvSpecs = dict[str, tuple[str, dict[str, Any]]]


def build_envs(specs: EnvSpecs) -> dict[str, Environment]:
    """One instance of every task's environment."""
    return {task: resolve_env_class(cls)(**kwargs) for task, (cls, kwargs) in specs.items()}


def unpack_single(ret: EnvironmentReturn, metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain-Python result of a 1-sample step (plain data pickles safely over a pipe)."""
    if len(ret.rewards) != 1:
        raise ValueError(f"env.step returned {len(ret.rewards)} rewards for a batch of 1 sample")
    reward = float(ret.rewards[0])
    if not math.isfinite(reward):
        # A NaN/inf reward would turn the group's advantages, the loss and every update into NaN;
        # raised here, it is a failed reward like any other (reward 0, counted in reward/errors).
        raise ValueError(f"env.step returned a non-finite reward ({reward}); rewards must be finite numbers")
    meta = ret.metadata[0] if ret.metadata and ret.metadata[0] is not None else dict(metadata)
    stops = ret.next_stop_strings[0] if ret.next_stop_strings else None
    return {
        "reward": reward,
        "terminated": bool(ret.terminateds[0]),
        "observation": ret.observations[0],
        "metadata": meta,
        "answer": ret.answers[0] if ret.answers else None,
        "next_stop_strings": stops,
    }


def failed(metadata: dict[str, Any] | None, message: str, kind: str = "error") -> dict[str, Any]:
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


def exception_text(e: BaseException) -> str:
    """The one line a failed reward leaves in the log, the sample's metadata and its observation,
    bounded: the exception comes from user code and may carry megabytes."""
    return clip_text(f"reward raised {type(e).__name__}: {e}")


def traceback_text() -> str:
    """The current exception's traceback, bounded (its end, which names the error, is kept)."""
    return clip_text(traceback.format_exc(), TRACEBACK_LIMIT)


def score_one(envs: dict[str, Environment], task: str, message_log: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """Score one sample with its task's environment; exceptions propagate (the caller reports them)."""
    env = envs.get(task)
    if env is None:
        raise KeyError(f"no environment for task {task!r} (configured: {sorted(envs)})")
    return unpack_single(env.step([message_log], [metadata]), metadata)


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker when the trainer dies, even while a sample runs forever."""
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(specs: EnvSpecs, conn: Connection, parent_pid: int) -> None:
    """Worker process: build every task's environment, then score jobs until told to stop."""
    # Ctrl-C reaches the whole process group, and so does SIGTERM from Slurm (every process of the
    # job step) or `kill -- -PGID`; the parent decides when workers stop, after its checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        envs = build_envs(specs)
    except BaseException:
        conn.send(("init_error", traceback_text()))
        return
    conn.send(("ready", None))
    default_task = next(iter(specs))  # for a job without a task (older 3-tuple jobs)
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
        job_id, message_log, metadata, *rest = job
        task = rest[0] if rest else default_task
        try:
            conn.send(("result", job_id, score_one(envs, task, message_log, metadata)))
        except Exception as e:
            conn.send(("error", job_id, exception_text(e), traceback_text()))


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, ctx: Any, specs: EnvSpecs) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        # daemon: multiprocessing's own exit handler terminates it if close() never ran.
        self.process = ctx.Process(
            target=worker_main, args=(specs, child_conn, os.getpid()), daemon=True,
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


class RewardWorkerActor:
    """The body of one reward worker that is a Ray actor (``posttrain.cluster.ray_rewards``): every
    task's environment, built once, and the scoring of one sample per call, with the messages of
    ``worker_main`` (less the job id). Defined here, with no Ray import, so that an actor imports
    only ``posttrain.envs``."""

    def __init__(self, specs: EnvSpecs, sys_path: list[str]) -> None:
        # As a spawned local worker: the trainer's import path, where it exists on this node.
        sys.path.extend(p for p in sys_path if p not in sys.path and os.path.isdir(p))
        self.init_error: str | None = None
        try:
            self.envs = build_envs(specs)
        except BaseException:  # noqa: BLE001 - reported by ready(), as the local worker's init_error
            self.envs = {}
            self.init_error = traceback_text()

    def ready(self) -> tuple[int, str | None]:
        """``(pid, None)`` once the environments are built, ``(pid, traceback)`` if that failed."""
        return os.getpid(), self.init_error

    def score(self, message_log: MessageLog, metadata: dict[str, Any], task: str) -> tuple:
        """``("result", result)`` or ``("error", message, traceback)``: the local worker's messages."""
        try:
            return ("result", score_one(self.envs, task, message_log, metadata))
        except Exception as e:  # noqa: BLE001 - user code: any exception is this sample's error
            return ("error", exception_text(e), traceback_text())
