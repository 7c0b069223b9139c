"""Which torch scripts/setup.sh installs: prints the pip arguments, one per line.

- TORCH_SPEC and/or TORCH_INDEX_URL: as given (TORCH_INDEX_URL replaces pip's index).
- A GPU that ``nvidia-smi -L`` lists: PyPI's default Linux wheel, a CUDA build.
- No GPU on macOS: PyPI's wheel, which is a CPU build there.
- No GPU elsewhere: the CPU build, ``torch==2.13.0+cpu``. PyPI's Linux wheel of the same version is
  a CUDA build that pulls in about 16 nvidia-* packages and triton, so the CPU build comes from
  PyTorch's CPU index, added as an extra index; where pip's configured sources already hold the
  CPU build (a local wheel or mirror), they are used alone, so an offline machine does not wait on
  an index it cannot reach.

Run with the virtual environment's python: the check asks that environment's pip.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Callable, Mapping

CPU_VERSION = "2.13.0"
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
CUDA_SPEC = "torch>=2.6"  # PyPI's default Linux wheel is a CUDA build
GPU_CHECK_TIMEOUT_S = 30
PIP_CHECK_TIMEOUT_S = 300


def torch_pip_args(env: Mapping[str, str], gpu_visible: Callable[[], bool], system: str,
                   pip_finds: Callable[[str], bool]) -> list[str]:
    """The ``pip install`` arguments for torch. ``gpu_visible()``: whether a GPU is seen;
    ``system``: platform.system(); ``pip_finds(spec)``: whether pip's configured sources alone
    hold a wheel for ``spec``."""
    spec, index_url = env.get("TORCH_SPEC", ""), env.get("TORCH_INDEX_URL", "")
    if index_url:  # the index decides the build (a cu121 index, a CPU index, a mirror)
        return [spec or f"torch=={CPU_VERSION}", "--index-url", index_url]
    if spec:
        return [spec]
    if gpu_visible():
        return [CUDA_SPEC]
    if system == "Darwin":
        return [f"torch=={CPU_VERSION}"]
    cpu_spec = f"torch=={CPU_VERSION}+cpu"
    return [cpu_spec] if pip_finds(cpu_spec) else [cpu_spec, "--extra-index-url", CPU_INDEX_URL]


def nvidia_gpu_visible() -> bool:
    """Whether ``nvidia-smi -L`` runs and lists a GPU (an nvidia-smi without a driver fails)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=GPU_CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def pip_finds(spec: str) -> bool:
    """Whether this environment's pip resolves ``spec`` from its configured sources alone (a dry
    run: nothing is installed). No retries: an unreachable index answers "no" at once."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--retries", "0", "--timeout", "15", spec]
    try:
        return subprocess.run(command, capture_output=True, timeout=PIP_CHECK_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> int:
    args = torch_pip_args(os.environ, nvidia_gpu_visible, platform.system(), pip_finds)
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
