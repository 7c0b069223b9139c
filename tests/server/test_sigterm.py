"""SIGTERM (docker stop, Kubernetes, Slurm) stops the servers as Ctrl-C does: uvicorn's graceful
shutdown, then one line on stderr and exit code 143."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ports import start_server_process  # noqa: E402

SERVERS = {
    "rollout-api": lambda port: [sys.executable, "-m", "posttrain", "rollout-api", "--port", str(port)],
    # The prompt proxy with --dry-run calls no backend: the same uvicorn path as `posttrain serve`.
    "proxy": lambda port: [sys.executable, "-m", "posttrain", "serve", "--prompt-config", "plain", "--dry-run",
                           "--port", str(port)],
}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_sigterm_stops_the_server_with_exit_143(tmp_path, name):
    log = tmp_path / "server.log"
    _, proc = start_server_process(SERVERS[name], log, timeout_s=60)
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not exit after SIGTERM:\n{log.read_text()}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output = log.read_text()
    assert code == 143, output
    assert "posttrain: stopped by SIGTERM." in output
    assert "Traceback" not in output, output
