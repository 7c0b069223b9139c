from __future__ import annotations

import os
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from posttrain.envs.sandbox import namespaces_available, run_python

LIMITS = dict(timeout_s=3.0, cpu_s=2.0, memory_mb=256, max_output_bytes=10_000, nproc=32)
IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]


def run(code: str, **kw):
    return run_python(code, **{**LIMITS, **kw})


def test_runs_code_with_stdin_and_minimal_env():
    r = run("import os\nprint(input()[::-1])\nprint(sorted(os.environ))", stdin="abc\n")
    assert r.returncode == 0 and r.killed_reason is None
    assert r.stdout.splitlines()[0] == "cba"
    assert "VIRTUAL_ENV" not in r.stdout and "PYTHONPATH" not in r.stdout


def test_failing_code_reports_returncode_and_stderr():
    r = run("raise ValueError('boom')")
    assert r.returncode == 1 and "ValueError: boom" in r.stderr


def test_infinite_loop_is_stopped():
    t = time.monotonic()
    r = run("while True: pass", timeout_s=1.5, cpu_s=1)
    assert time.monotonic() - t < 3.5
    assert r.timed_out and r.killed_reason in ("timeout", "cpu") and r.returncode != 0


def test_sleep_hits_wall_clock_timeout():
    t = time.monotonic()
    r = run("import time; time.sleep(30)", timeout_s=1.0)
    assert time.monotonic() - t < 3 and r.killed_reason == "timeout" and r.timed_out


def test_memory_bomb_fails():
    r = run("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert r.returncode != 0 and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_huge_output_is_capped():
    t = time.monotonic()
    r = run("while True: print('a' * 1000)", max_output_bytes=5000)
    assert time.monotonic() - t < 3
    assert r.output_truncated and r.killed_reason == "output" and len(r.stdout) <= 5000


def test_fork_bomb_is_bounded():
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(n)\n"
    )
    t = time.monotonic()
    r = run(code, nproc=16, timeout_s=2.0)
    assert time.monotonic() - t < 4
    if IS_ROOT:  # the sandbox user (nobody) has only the sandbox's processes
        assert int(r.stdout.strip()) < 16
    else:  # NPROC counts all of this user's processes: only "bounded" is known
        assert int(r.stdout.strip() or 0) < 200


def test_no_files_written_outside_workdir():
    target = Path(tempfile.gettempdir()) / f"posttrain_escape_{uuid.uuid4().hex}"
    repo_target = REPO / f"posttrain_escape_{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"for p in [{str(target)!r}, {str(repo_target)!r}]:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('failed', p, e)\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print(open('inside.txt').read())\n"
    )
    try:
        r = run(code)
        assert r.returncode == 0 and r.stdout.rstrip().endswith("ok")
        if IS_ROOT:  # as nobody the repository (owned by root) is not writable
            assert f"failed {repo_target}" in r.stdout
        assert not repo_target.exists()
        if not namespaces_available():
            pytest.skip("no mount namespace here: /tmp is world-writable and not private to the sandbox")
        assert not target.exists()  # written (at most) into the sandbox's private /tmp
    finally:
        for p in (target, repo_target):
            if p.exists():
                p.unlink()


def test_workdir_is_removed():
    r = run("import os; print(os.getcwd())")
    assert r.returncode == 0 and not os.path.exists(r.stdout.strip())


def test_socket_connection_fails():
    if not namespaces_available():
        pytest.skip("network namespaces are unavailable here (needs root/CAP_SYS_ADMIN); network is not blocked")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket\ns = socket.socket(); s.settimeout(1)\n"
            f"s.connect(('127.0.0.1', {port}))\nprint('connected')\n"
        )
        r = run(code)
        assert "connected" not in r.stdout and r.returncode != 0
        assert r.isolated_network
    finally:
        server.close()


def test_cannot_read_trainer_files(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root: the sandbox drops privileges only when the trainer runs as root")
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    os.chmod(secret_dir, 0o700)
    secret = secret_dir / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.chmod(secret, 0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_uid == 0
    r = run(f"print(open({str(secret)!r}).read())")
    assert "TOP-SECRET" not in r.stdout and r.returncode != 0
    assert "PermissionError" in r.stderr or "FileNotFoundError" in r.stderr
