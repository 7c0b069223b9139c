"""Small pieces every training recipe shares: seeding, the run folder, the log file."""

from __future__ import annotations

import logging
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    seed %= 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_output_dir(output_dir: str, resume_ckpt: Path | None, command: str) -> Path:
    """The run folder: as configured, else the resumed run's, else runs/<command>-<timestamp>."""
    if output_dir:
        return Path(output_dir)
    if resume_ckpt is not None:
        return resume_ckpt.parent.parent  # <run>/checkpoints/step_N
    return Path("runs") / f"{command}-{datetime.now():%Y%m%d-%H%M%S}"


def log_to_file(path: Path) -> None:
    """Also write posttrain's log records to ``path`` (the run's train.log)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("posttrain").addHandler(handler)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values.detach().float() * mask).sum() / mask.sum().clamp(min=1))
