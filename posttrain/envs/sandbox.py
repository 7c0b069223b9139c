"""Run untrusted Python (model-written code) in a contained subprocess.

``run_python`` starts ``python -I -S`` (isolated mode: no site-packages, no PYTHON* variables,
no user site, script dir not on sys.path) in a private temporary working directory with a
minimal environment, and contains it with:

- resource limits (``setrlimit`` in the child): CPU seconds, address space, file size, open
  files, no core dumps, and a process count;
- when the parent runs as root: an unprivileged uid/gid (default 65534, nobody) so that the
  process limit applies and files readable only by the trainer's user are out of reach;
- when the kernel allows it (root, or CAP_SYS_ADMIN): new network, mount, PID, IPC and UTS
  namespaces. The network namespace has no interfaces up (not even loopback), so every
  connection fails. The mount namespace gets private, size-limited tmpfs mounts over /tmp,
  /var/tmp, /dev/shm and /run/lock, so writes there vanish with the sandbox. In the PID
  namespace the code runs as PID 1: when it exits, the kernel kills every process it left
  behind, including ones that left the process group with setsid();
- a wall-clock timeout that kills the whole process group, and caps on captured output (the
  run is killed once it prints more than ``max_output_bytes``).

Without namespaces (an unprivileged container) the run goes on with the other limits and a
warning is logged once per process: network access and writes to world-writable directories
are then NOT blocked. ``namespaces_available()`` says which mode is active.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from posttrain.errors import PosttrainError

logger = logging.getLogger(__name__)

# Linux clone(2)/mount(2) flags.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_NAMESPACE_FLAGS = _CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWPID | _CLONE_NEWNET
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

# World-writable directories that get a private tmpfs inside the mount namespace.
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


@dataclass
class SandboxResult:
    """What one sandboxed run did.

    returncode: exit status (negative: killed by that signal, as in subprocess).
    stdout, stderr: captured output (decoded as UTF-8 with replacement), truncated at the cap.
    timed_out: the wall-clock or CPU limit ended the run.
    killed_reason: None for a normal exit, else 'timeout' (wall clock), 'cpu' (RLIMIT_CPU),
        'output' (more than max_output_bytes printed), 'signal:<n>' (another signal),
        or 'start' (the sandbox could not be set up; stderr says why).
    output_truncated: stdout or stderr was cut at the cap.
    isolated_network: the run was in its own network namespace.
    wall_s: seconds the run took.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None
    output_truncated: bool = False
    isolated_network: bool = False
    wall_s: float = 0.0


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_namespaces(tmpfs_size_bytes: int) -> None:
    """unshare + private mount propagation + private tmp dirs (in the child, before exec;
    its cwd is the working directory)."""
    _check(_libc.unshare(_NAMESPACE_FLAGS), "unshare")
    # Without this, mounts made below would propagate to the host's mount namespace.
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    opts = f"size={max(tmpfs_size_bytes, 4096)},mode=1777".encode()
    for path in _PRIVATE_TMP_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), f"mount {path}")
    # The working directory (the cwd, under /tmp) is now hidden behind the new /tmp: bind it back
    # at its old path, since Python opens the script by its absolute path.
    cwd = os.getcwd()
    if not (os.path.exists(cwd) and os.path.samestat(os.stat("."), os.stat(cwd))):
        os.makedirs(cwd, exist_ok=True)
        _check(_libc.mount(b"/proc/self/cwd", cwd.encode(), None, _MS_BIND, None), f"bind {cwd}")


def _become_pid1() -> None:
    """After unshare(CLONE_NEWPID) only children enter the new PID namespace: fork, let the
    child go on to exec as PID 1, and make this process wait and exit as the child did."""
    pid = os.fork()
    if pid == 0:
        return
    try:
        # Drop our copies of the pipes, above all subprocess's exec-error pipe: Popen() reads it
        # until EOF, which would otherwise come only when the program has finished.
        os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                if sig not in (signal.SIGKILL, signal.SIGSTOP):
                    signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
            except (OSError, ValueError):
                pass
            os._exit(128 + sig)
        os._exit(os.waitstatus_to_exitcode(status))
    finally:
        os._exit(255)


@dataclass(frozen=True)
class _ChildSetup:
    """preexec_fn: everything runs in the forked child, so it uses only pre-bound names."""

    use_namespaces: bool
    drop_to: tuple[int, int] | None
    cpu_s: int
    memory_bytes: int
    fsize_bytes: int
    nofile: int
    nproc: int

    def __call__(self) -> None:
        if self.use_namespaces:
            _enter_namespaces(self.fsize_bytes)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            _become_pid1()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # PID 1 of a namespace ignores SIGXCPU (the soft limit); the hard limit's SIGKILL ends it.
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_s, self.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_bytes, self.fsize_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        resource.setrlimit(resource.RLIMIT_NPROC, (self.nproc, self.nproc))
        if self.drop_to is not None:
            uid, gid = self.drop_to
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid:
                raise OSError("could not drop privileges")


def _probe_run(python: str, use_namespaces: bool) -> None:
    """Start ``python`` the way run_python does (raises, or returns only if it exited 0)."""
    drop_to = (SANDBOX_UID, SANDBOX_GID) if os.geteuid() == 0 else None
    proc = subprocess.run(
        [python, "-I", "-S", "-c", "pass"],
        preexec_fn=_ChildSetup(use_namespaces, drop_to, 5, 1 << 30, 1 << 20, 64, 1 << 16),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_child_env("/"), cwd="/", timeout=30, start_new_session=True,
    )
    if proc.returncode != 0:
        raise OSError(f"{python} exited with {proc.returncode}")


def _candidate_pythons() -> list[str]:
    """The running interpreter, then the system's python3: a venv under /root is out of reach of
    the unprivileged sandbox user, and ``-I -S`` needs only the standard library anyway."""
    found = [os.path.realpath(sys.executable)]
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and os.path.realpath(system) not in found:
        found.append(os.path.realpath(system))
    return found


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> tuple[bool, str | None]:
    """(namespaces available, interpreter the sandbox user can run or None), probed once."""
    try:
        _probe_run(_candidate_pythons()[0], True)
        use_ns, why = True, ""
    except subprocess.SubprocessError as e:  # raised in preexec_fn: unshare/mount not permitted
        use_ns, why = False, f"{type(e).__name__}: {e}"
    except OSError:
        use_ns, why = True, ""  # the interpreter is the problem; namespaces are tried again below
    python = None
    for candidate in _candidate_pythons():
        try:
            _probe_run(candidate, use_ns)
            python = candidate
            break
        except subprocess.SubprocessError as e:
            if use_ns:
                use_ns, why = False, f"{type(e).__name__}: {e}"
        except OSError:
            continue
    if python is not None and use_ns is False:
        try:  # the first failure may have come from the interpreter, not from unshare
            _probe_run(python, True)
            use_ns = True
        except (subprocess.SubprocessError, OSError):
            pass
    if not use_ns:
        logger.warning(
            "code sandbox: cannot create network/mount/PID namespaces here (%s; needs root or "
            "CAP_SYS_ADMIN). Sandboxed code runs with resource limits%s but CAN use the network "
            "and write to world-writable directories such as /tmp.",
            why or "not permitted", " and as an unprivileged user" if os.geteuid() == 0 else "",
        )
    return use_ns, python


def namespaces_available() -> bool:
    """Whether sandboxed runs get their own network/mount/PID namespaces."""
    return sandbox_mode()[0]


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "PYTHONIOENCODING": "utf-8",  # ignored under -I, kept for clarity: LANG sets UTF-8
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits without reaping it (False if the deadline passes first)."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float,
    cpu_s: float,
    memory_mb: int,
    max_output_bytes: int,
    nproc: int = 32,
    nofile: int = 64,
    max_file_mb: int = 16,
    uid: int = SANDBOX_UID,
    gid: int = SANDBOX_GID,
) -> SandboxResult:
    """Run ``code`` with ``python -I -S`` in the sandbox described in the module docstring.

    stdin: text fed to the program's standard input.
    timeout_s: wall-clock limit; the process group is killed when it passes.
    cpu_s: CPU-time limit (RLIMIT_CPU, whole seconds, at least 1).
    memory_mb: address-space limit (RLIMIT_AS); Python itself needs about 30 MB.
    max_output_bytes: cap on stdout and on stderr each; printing more kills the run.
    nproc: process limit (RLIMIT_NPROC) for the sandbox user; applies to non-root users only,
        which is why root drops to ``uid``/``gid`` (nobody).
    nofile, max_file_mb: open-file and file-size limits.
    """
    use_ns, python = sandbox_mode()
    if python is None:
        raise PosttrainError(
            "code sandbox: no Python interpreter that the sandbox user "
            f"(uid {uid if os.geteuid() == 0 else os.geteuid()}) can run: tried "
            f"{', '.join(_candidate_pythons())}. Install a system python3 (apt-get install python3) "
            "or make the running interpreter readable and executable by that user."
        )
    is_root = os.geteuid() == 0
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="posttrain_sandbox_")
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        os.chmod(script, 0o644)
        if is_root:
            os.chown(workdir, uid, gid)
        os.chmod(workdir, 0o700)
        setup = _ChildSetup(
            use_namespaces=use_ns,
            drop_to=(uid, gid) if is_root else None,
            cpu_s=max(1, int(cpu_s + 0.999)),
            memory_bytes=int(memory_mb) * 1024 * 1024,
            fsize_bytes=int(max_file_mb) * 1024 * 1024,
            nofile=int(nofile),
            nproc=int(nproc),
        )
        with open(stdin_path, "rb") as stdin_file:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "main.py"],
                    cwd=workdir, env=_child_env(workdir), stdin=stdin_file,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    preexec_fn=setup, start_new_session=True, close_fds=True,
                )
            except (subprocess.SubprocessError, OSError) as e:
                return SandboxResult(
                    returncode=-1, stdout="", stderr=f"sandbox setup failed: {type(e).__name__}: {e}",
                    killed_reason="start", isolated_network=use_ns, wall_s=time.monotonic() - start,
                )
        result = _collect(proc, timeout_s, max_output_bytes)
        result.isolated_network = use_ns
        result.wall_s = time.monotonic() - start
        if result.killed_reason is None and result.returncode < 0:
            sig = -result.returncode
            if sig in (signal.SIGXCPU, signal.SIGKILL) and result.wall_s >= setup.cpu_s * 0.9:
                result.killed_reason, result.timed_out = "cpu", True
            else:
                result.killed_reason = f"signal:{sig}"
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read_available(events: list, sel: selectors.BaseSelector, buffers: dict, cap: int) -> bool:
    """Read what the ready pipes hold into their buffers; True if a buffer went over ``cap``."""
    over = False
    for key, _ in events:
        while True:
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                sel.unregister(key.fileobj)
                break
            buf = buffers[key.fileobj]
            room = cap - len(buf)
            buf += chunk[: max(room, 0)]
            if len(chunk) > room:
                over = True
                break
    return over


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> SandboxResult:
    """Read stdout/stderr (each up to ``cap`` bytes) until exit or the deadline."""
    deadline = time.monotonic() + timeout_s
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    truncated = False
    killed_reason = None
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_reason = "timeout"
                break
            events = sel.select(timeout=min(remaining, 0.1))
            truncated |= _read_available(events, sel, buffers, cap)
            if truncated:
                killed_reason = "output"
                break
            if not events and _wait_unreaped(proc.pid, 0.0):
                break  # exited, but a background child may still hold the pipes open
        if killed_reason is None and not _wait_unreaped(proc.pid, deadline):
            killed_reason = "timeout"
    finally:
        # The leader is exited-but-unreaped (or still running) here, so its pid, the group id,
        # cannot have been reused: leftovers in the group (background children) die with it.
        _kill_group(proc)
        proc.wait(timeout=30)  # SIGKILLed just above: returns at once
        if killed_reason != "output":
            truncated |= _read_available(sel.select(timeout=0), sel, buffers, cap)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return SandboxResult(
        returncode=proc.returncode,
        stdout=bytes(buffers[proc.stdout]).decode("utf-8", "replace"),
        stderr=bytes(buffers[proc.stderr]).decode("utf-8", "replace"),
        timed_out=killed_reason == "timeout",
        killed_reason=killed_reason,
        output_truncated=truncated,
    )
