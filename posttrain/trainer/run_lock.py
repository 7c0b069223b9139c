"""One run per run folder: an exclusive lock that a second run (or a --resume while the first is
still running) finds, naming the host and process that hold it.

The lock is ``fcntl.flock`` on ``<run folder>/.posttrain.lock``: the kernel drops it when the
holding process ends, however it ends, so a killed run never blocks the next one. The file also
holds the holder's host, pid and start time, for the message; it is emptied on a clean release,
so a file with a holder but no lock is what a killed or crashed run leaves behind (taken over with
a warning)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from posttrain.errors import ConfigError

LOCK_FILE = ".posttrain.lock"
logger = logging.getLogger("posttrain.trainer")


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock. A ConfigError: the run did not start (exit 2)."""


class RunFolderLock:
    """The lock of one run folder, held from ``acquire()`` to ``release()`` (or the process's end)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock at once, or raise RunFolderBusy naming the holder. Never waits: a second
        run on the same folder is a mistake to report, not something to queue behind."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(_busy_message(self.path.parent, holder)) from None
            # A file system without locks (some network mounts): run unlocked rather than not at all.
            logger.warning("Cannot lock the run folder %s (%s): nothing stops a second run from writing into it "
                           "meanwhile.", self.path.parent, os.strerror(exc.errno or 0) or exc)
            return
        previous = _read_holder(fd)
        if previous:
            logger.warning("Taking over the run folder %s from %s, which ended without releasing it (killed or "
                           "crashed): its last complete checkpoint is what --resume continues from.",
                           self.path.parent, _describe(previous))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(["posttrain", *sys.argv[1:2]])}  # which trainer; the full line can be long
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the holder record (a clean end), then unlock. The file stays: deleting a lock file
        races with a process that has just opened it and would lock a file no one else sees."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> dict:
    """The holder record in the lock file ({} when empty or unreadable: a damaged record must not stop a run)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "another process (its record in the lock file is unreadable)"
    text = f"process {holder.get('pid')} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _busy_message(folder: Path, holder: dict) -> str:
    message = (f"The run folder {folder} is in use by {_describe(holder)}: two runs writing one folder would mix "
               "their metrics and checkpoints. Wait for that run to end (or stop it: Ctrl-C or SIGTERM saves a "
               "checkpoint) before --resume, or set trainer.output_dir to another folder.")
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        # flock is released when the last holder closes the file: a process that inherited it still holds it.
        message += (f" Process {holder['pid']} has exited, so a process it started holds the lock file "
                    f"({folder / LOCK_FILE}); `fuser -v {folder / LOCK_FILE}` names it.")
    return message


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


_held: RunFolderLock | None = None


def lock_run_folder(folder: str | Path) -> None:
    """Lock ``folder`` for this process's run, releasing the lock of an earlier run of this
    process first (tests and notebooks run several trainings in one process, one at a time)."""
    global _held
    release_run_folder()
    lock = RunFolderLock(folder)
    lock.acquire()
    _held = lock


def release_run_folder() -> None:
    """Release the run folder's lock, if this process holds one (the CLI calls it when a run ends)."""
    global _held
    if _held is not None:
        lock, _held = _held, None
        lock.release()
