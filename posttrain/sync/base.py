"""What every sync mode shares: its interface, its error, and where transfer files go."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.sync")


class SyncError(PosttrainError):
    """Weights could not reach an engine; the message names the engine, the step and the fix."""


class WeightSync(Protocol):
    """One way of moving the trainer's weights to the engine(s)."""

    name: str

    def connect(self) -> None:
        """Set up the transport (e.g. join a process group); again after an engine restarted."""
        ...

    def push(self, version: int, step: int) -> int:
        """Send the current weights as policy ``version`` (``step``: for error messages); returns
        the bytes moved."""
        ...

    def close(self) -> None:
        ...


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wire_dtype(name: str) -> torch.dtype | None:
    """``sync.dtype`` as a torch dtype; ``None`` for 'auto' (keep the trainer's dtype)."""
    return None if name == "auto" else DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the dtype strings of SGLang's weight-update requests."""
    return str(dtype).removeprefix("torch.")


def transfer_dir(configured: str, what: str, needed_bytes: int = 0) -> Path:
    """The folder for checkpoint/lora transfers: ``configured``, else one under /dev/shm (memory,
    so writing and reading never touch a disk) when it has room for twice ``needed_bytes`` (the
    file and its next version being written), else under the system temp folder. Containers often
    give /dev/shm only 64 MB."""
    if configured:
        path = Path(configured).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    shm = "/dev/shm"
    roomy = os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * needed_bytes
    if not roomy and os.path.isdir(shm):
        logger.warning("/dev/shm has no room for %.0f MB of weights; writing them under %s instead (slower). "
                       "Give the container more shared memory (e.g. docker --shm-size) or set sync.checkpoint_dir.",
                       2 * needed_bytes / 1e6, tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"posttrain-{what}-", dir=shm if roomy else tempfile.gettempdir()))
