"""scripts/setup.sh's choice of torch (scripts/torch_spec.py): a CUDA build where nvidia-smi lists
a GPU, the CPU build from PyTorch's CPU index where none is seen (pip's own sources alone where
they hold it), and TORCH_SPEC / TORCH_INDEX_URL as given."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "torch_spec.py"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


torch_spec = load_script(SCRIPT, "torch_spec")


def choose(env=None, gpu=False, system="Linux", finds=False):
    asked = []

    def pip_finds(spec):
        asked.append(spec)
        return finds

    return torch_spec.torch_pip_args(env or {}, lambda: gpu, system, pip_finds), asked


def test_a_gpu_gets_the_cuda_build_from_pypi():
    assert choose(gpu=True)[0] == ["torch>=2.6"]


def test_no_gpu_gets_the_cpu_build_from_the_cpu_index():
    args, asked = choose(gpu=False)
    assert args == ["torch==2.13.0+cpu", "--extra-index-url", CPU_INDEX] and asked == ["torch==2.13.0+cpu"]


def test_no_gpu_uses_pips_own_sources_where_they_hold_the_cpu_build():
    assert choose(gpu=False, finds=True)[0] == ["torch==2.13.0+cpu"]  # e.g. a local wheel, offline


def test_macos_gets_pypis_wheel_which_is_a_cpu_build_there():
    assert choose(gpu=False, system="Darwin")[0] == ["torch==2.13.0"]


@pytest.mark.parametrize("env,gpu,expected", [
    ({"TORCH_SPEC": "torch==2.12.0"}, True, ["torch==2.12.0"]),
    ({"TORCH_SPEC": "torch==2.12.0"}, False, ["torch==2.12.0"]),
    ({"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu126"}, False,
     ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126"]),
    ({"TORCH_SPEC": "torch<3", "TORCH_INDEX_URL": CPU_INDEX}, True, ["torch<3", "--index-url", CPU_INDEX]),
])
def test_torch_spec_and_torch_index_url_win(env, gpu, expected):
    args, asked = choose(env, gpu=gpu)
    assert args == expected and asked == []


def _fake_nvidia_smi(folder: Path, code: int) -> Path:
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\nexit {code}\n")
    tool.chmod(0o755)
    return folder


def _fake_torch_wheel(folder: Path) -> None:
    """A minimal valid wheel named as the CPU build: enough for pip to resolve it offline."""
    folder.mkdir()
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(folder / "torch-2.13.0+cpu-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def _offline_env(tmp_path: Path, path: str, wheels: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TORCH_"))}
    # No index at all, and only `wheels` as a source: what pip's own sources hold is up to the test.
    env.update(PATH=path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_CONFIG_FILE=os.devnull)
    return env


def _run_script(env) -> list[str]:
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("wheel", [False, True])
def test_the_script_with_a_fake_nvidia_smi_on_path(tmp_path, wheel):
    wheels = tmp_path / "wheels"
    if wheel:
        _fake_torch_wheel(wheels)
    else:
        wheels.mkdir()
    system_path = "/usr/bin:/bin"
    gpu = _fake_nvidia_smi(tmp_path / "gpu", 0)
    no_driver = _fake_nvidia_smi(tmp_path / "no_driver", 9)  # installed, but it sees no GPU
    assert _run_script(_offline_env(tmp_path, f"{gpu}:{system_path}", wheels)) == ["torch>=2.6"]
    cpu = ["torch==2.13.0+cpu"] + ([] if wheel else ["--extra-index-url", CPU_INDEX])
    assert _run_script(_offline_env(tmp_path, f"{no_driver}:{system_path}", wheels)) == cpu
    assert _run_script(_offline_env(tmp_path, system_path, wheels)) == cpu


def test_setup_sh_installs_what_the_script_chose(tmp_path):
    """setup.sh with a stand-in venv python that records each pip command instead of running it."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"""#!/bin/sh
case "$1" in
  -c) exit 1 ;;
  -m) shift; echo "$*" >> "{log}"; exit 0 ;;
  *) exec "{sys.executable}" "$@" ;;
esac
""")
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = _offline_env(tmp_path, f"{_fake_nvidia_smi(tmp_path / 'gpu', 9)}:/usr/bin:/bin", wheels)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh"), str(venv)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = log.read_text().splitlines()[0]
    assert first.endswith(f"install --disable-pip-version-check -q torch==2.13.0+cpu --extra-index-url {CPU_INDEX}")
    assert (venv / ".installed").exists()
