"""Ports and server processes for tests, without races and without waits that never end.

- In-process servers get a socket already bound to port 0 (``bound_socket``; uvicorn takes it),
  so no other process can take the port between choosing and listening.
- A server in a child process cannot take a socket over: ``server_process`` picks a free port,
  and starts again on another one if the child reports EADDRINUSE. Its output goes to a log file
  (a pipe nobody reads fills up and blocks the child), whose tail is in every error.
- "Nobody listens there" tests hold a port bound but not listening (``closed_port``): connecting
  is refused at once, and no other process can start listening on it meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx


def free_port() -> int:
    """A port free a moment ago; another process may take it before it is used. Prefer the helpers below."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1 (read it from ``getsockname()[1]``), for a
    server that accepts an open socket (``uvicorn.Server.run(sockets=[...])``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens for the whole block: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Until ``url`` answers 200; RuntimeError with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode} before it answered:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server for {url} did not answer within {timeout_s:g} s:\n{_log_tail(log_path)}")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def start_server_process(make_args: Callable[[int], Sequence[str]], log_path: Path, *, env: dict | None = None,
                         health_path: str = "/health", timeout_s: float = 90.0, port: int | None = None,
                         attempts: int = 3) -> tuple[str, subprocess.Popen]:
    """Start ``make_args(port)`` with its output in ``log_path`` and wait until it is healthy; on
    EADDRINUSE (another process took the port) try again on another free port. ``port``: use this
    one (a restart on the same address), without retries. Returns (base URL, process)."""
    for attempt in range(1 if port is not None else attempts):
        chosen = port if port is not None else free_port()
        with open(log_path, "a") as log:
            proc = subprocess.Popen(list(make_args(chosen)), env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{chosen}"
        try:
            wait_healthy(url + health_path, proc, log_path, timeout_s)
            return url, proc
        except RuntimeError:
            stop_process(proc)
            in_use = "address already in use" in _log_tail(log_path).lower()
            if not in_use or port is not None or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def server_process(make_args: Callable[[int], Sequence[str]], log_path: Path, **kwargs) -> Iterator[tuple[str, subprocess.Popen]]:
    """``start_server_process`` for the block; the process is stopped at its end."""
    url, proc = start_server_process(make_args, log_path, **kwargs)
    try:
        yield url, proc
    finally:
        stop_process(proc)
