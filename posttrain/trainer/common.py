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


def start_run(cfg, resume_from: str | None, command: str) -> tuple[Path, Path | None]:
    """The prologue of every recipe: resolve the checkpoint to resume, create the run folder with
    its train.log and config.yaml, and seed everything. Returns (run folder, checkpoint or None)."""
    from posttrain.checkpoint.manager import CheckpointManager
    from posttrain.config.loader import config_to_yaml

    from posttrain.distributed import broadcast_object, is_main_process

    resume_ckpt = CheckpointManager.resolve(resume_from) if resume_from else None
    # Several ranks: rank 0's clock names the folder; rank 0 alone writes the log and config.
    output_dir = Path(broadcast_object(str(resolve_output_dir(cfg.trainer.output_dir, resume_ckpt, command))))
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        log_to_file(output_dir / "train.log")
        (output_dir / "config.yaml").write_text(config_to_yaml(cfg))
        logging.getLogger("posttrain.trainer").info("Run folder: %s", output_dir)
    else:
        logging.getLogger("posttrain").setLevel(logging.WARNING)
    seed_everything(cfg.seed)
    return output_dir, resume_ckpt


def due(step: int, every: int, last_step: int | None = None) -> bool:
    """Whether a periodic action (log, validate, checkpoint) runs after ``step``: every ``every``
    steps (0 = never), skipping ``last_step``, whose end-of-run action happens anyway."""
    return bool(every) and step % every == 0 and step != last_step


def save_on_interrupt(completed: int, start_step: int, save_checkpoint, write) -> None:
    """Ctrl-C: checkpoint the last whole step, if this process completed any."""
    if completed > start_step:
        write(f"interrupted: saving a checkpoint at the last completed step ({completed})")
        save_checkpoint()
    else:
        write("interrupted before a step completed: no new checkpoint to save")


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
