"""The suite's per-test cap (pytest-timeout, [tool.pytest.ini_options] in pyproject.toml) is active:
a test that hangs fails with its stack instead of holding the suite (and CI) forever."""

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("pytest_timeout")
ROOT = Path(__file__).resolve().parents[1]


def test_the_suite_has_a_per_test_cap():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < float(ini["timeout"]) <= 600


def test_a_hanging_test_fails_at_its_cap_and_the_run_goes_on(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 2\n")
    (tmp_path / "test_hang.py").write_text(
        "import threading, time\n"
        "def test_hangs():\n    threading.Event().wait()\n"
        "def test_after():\n    assert True\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Timeout" in out.stdout and "1 failed, 1 passed" in out.stdout, out.stdout
