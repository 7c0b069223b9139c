"""Errors meant for users: each message names the problem and how to fix it.

Exit codes of the CLI (``posttrain --help`` and README.md list them): EXIT_CONFIG for an invalid
configuration (nothing was started), EXIT_RUNTIME for any other failure, EXIT_INTERRUPTED after
Ctrl-C and EXIT_TERMINATED after SIGTERM (the trainer has saved a checkpoint of the last whole step).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell, Slurm and Kubernetes report for a SIGTERM'd process


class PosttrainError(Exception):
    """A problem the user can fix (bad input, missing file, impossible setting)."""


class ConfigError(PosttrainError):
    """An invalid configuration. The CLI prints it and exits with code 2 before any work starts."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: what ``kill``, ``docker stop``, Slurm preemption and Kubernetes eviction send. A
    KeyboardInterrupt, so every path that handles Ctrl-C (finish the weight update, checkpoint the
    last whole step, stop workers) handles it too; the CLI then exits with EXIT_TERMINATED."""


USER_TEXT_LIMIT = 2000  # characters of a message from user code (an env's exception) in one log line
TRACEBACK_LIMIT = 8000  # characters of a traceback from user code


def clip_text(text: str, limit: int = USER_TEXT_LIMIT) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and its end around a note
    of how much was cut. Text from user code (a reward environment's exception, a traceback) goes
    to the console and train.log on every step: a 20 MB message must not be copied whole there.
    The end is kept too, because a traceback's last lines name the error."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]} [... {cut:,} of {len(text):,} characters cut ...] {text[-tail:]}"


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: the first SIGTERM raises Terminated; from then on SIGTERM has its
    default action again, so a second one ends the process at once (a scheduler that lost patience,
    or a user who does not want the checkpoint)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (see raise_terminated). Only the main thread
    can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def free_space(path: str | Path) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), e.g. '1.2 GiB'."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def write_failure(exc: BaseException, path: str | Path, what: str, extra: str = "") -> PosttrainError:
    """A PosttrainError for a failed write of ``what`` to ``path``: the cause (disk full, read-only,
    size limit, ...), the free space there, and the fix."""
    os_error = exc
    while os_error is not None and not isinstance(os_error, OSError):
        os_error = os_error.__cause__ or os_error.__context__
    code = getattr(os_error, "errno", None)
    reason = _WRITE_HINTS.get(code) or (getattr(os_error, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__)
    if code is None and "File too large" in str(exc):
        reason = _WRITE_HINTS[errno.EFBIG]
    elif code is None and "No space" in str(exc):
        reason = _WRITE_HINTS[errno.ENOSPC]
    where = Path(path).parent if not Path(path).is_dir() else Path(path)
    message = (f"Could not write the {what} to '{path}': {reason} ({free_space(where)} free on that file system)."
               + (f" {extra}" if extra else "")
               + " Free some space, or point trainer.output_dir at a writable folder with room.")
    return PosttrainError(message)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that escaped to the CLI: what failed, on which path, and the free
    space there when the cause is a full disk or a size limit."""
    name = exc.filename
    text = f"{exc.strerror or exc}" + (f": '{name}'" if name else "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and name:
        text += f" ({free_space(os.fspath(name))} free on that file system)"
    return text
