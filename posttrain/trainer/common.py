"""Small pieces every training recipe shares: seeding, the run folder, the log file."""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import datetime
from pathlib import Path

import torch
import yaml

from posttrain.checkpoint.manager import CHECKPOINTS_SUBDIR, CheckpointManager
from posttrain.checkpoint.rng import seed_everything
from posttrain.config.loader import config_to_yaml
from posttrain.distributed import broadcast_object, is_main_process
from posttrain.errors import PosttrainError, Terminated
from posttrain.logging.metrics import METRICS_FILE
from posttrain.logging.progress import CONSOLE_LOGGER
from posttrain.trainer.run_lock import LOCK_FILE, lock_run_folder, release_run_folder


def start_run(cfg, resume_from: str | None, command: str) -> tuple[Path, Path | None]:
    """The prologue of every recipe: resolve the checkpoint to resume, create the run folder with
    its train.log and config.yaml, and seed everything. Returns (run folder, checkpoint or None)."""
    _remember_resumed_run(None)  # forget an earlier run of this process
    _remember_created_run(None)
    resume_ckpt = CheckpointManager.resolve(resume_from) if resume_from else None
    # Several ranks: rank 0's clock names the folder; rank 0 alone writes the log and config.
    output_dir = Path(broadcast_object(str(resolve_output_dir(cfg.trainer.output_dir, resume_ckpt, command))))
    if is_main_process():
        created = _topmost_missing(output_dir)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise PosttrainError(f"Cannot create the run folder '{output_dir}': it or a folder above it is a file. "
                                 "Set trainer.output_dir to a folder path.") from None
        lock_run_folder(output_dir)  # before anything is written there: a second run stops here (exit 2)
        if created is not None:
            _remember_created_run((output_dir, created))
        log_to_file(output_dir / "train.log")
        if resume_ckpt is not None:
            _remember_resumed_run(output_dir)
        write_run_config(output_dir, config_to_yaml(cfg), resumed=resume_ckpt is not None)
        logging.getLogger("posttrain.trainer").info("Run folder: %s", output_dir)
    else:
        logging.getLogger("posttrain").setLevel(logging.WARNING)
    seed_everything(cfg.seed)
    return output_dir, resume_ckpt


CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_SUBDIR = "config_history"

# A new run folder that start_run created in this process, and the topmost folder created with it
# (output_dir=a/b/run with no a/: a), for undo_failed_start.
_created_run: tuple[Path, Path] | None = None


def _remember_created_run(created: tuple[Path, Path] | None) -> None:
    global _created_run
    _created_run = created


def _topmost_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (None: ``path`` exists)."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def undo_failed_start() -> None:
    """After a new run failed or was interrupted before it wrote anything but the files of its
    start (train.log, config.yaml, the lock, an empty metrics.jsonl): remove the run folder it
    created, so a failed start (a bad model path, a data error) leaves no near-empty run folder
    behind for `--resume auto`, report or a person to trip over. A folder that holds anything more
    (a metrics line, a checkpoint, files of the user's) is kept. The CLI prints the error itself."""

    global _created_run
    if _created_run is None:
        return
    output_dir, topmost = _created_run
    _created_run = None
    start_files = {"train.log", CONFIG_FILE, LOCK_FILE, METRICS_FILE}
    try:
        entries = list(output_dir.iterdir())
        if any(p.name not in start_files or not p.is_file() for p in entries) or (
                (output_dir / METRICS_FILE).is_file() and (output_dir / METRICS_FILE).stat().st_size):
            return
        _close_run_log()  # train.log is open
        release_run_folder()
        for p in entries:
            p.unlink()
        folder = output_dir
        while True:  # the run folder, then the parents created with it, while they are empty
            folder.rmdir()
            if folder == topmost or folder.parent == folder:
                break
            folder = folder.parent
    except OSError as e:  # the run's own error is the one to report
        logging.getLogger("posttrain.trainer").warning("Could not remove the run folder %s of the failed start "
                                                       "(%s); delete it by hand.", output_dir, e)


# What start_run found in the folder of the run it resumes, for undo_failed_resume: the run
# folder, its config.yaml text (None: there was none), the config_history/ files and the
# checkpoints (name, inode: a checkpoint saved again under its name is a new folder) it held.
_resumed_run: tuple[Path, str | None, set[str], set[tuple[str, int]]] | None = None


def _remember_resumed_run(output_dir: Path | None) -> None:
    global _resumed_run
    if output_dir is None:
        _resumed_run = None
        return
    path = output_dir / CONFIG_FILE
    old_text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    _resumed_run = (output_dir, old_text, _history_files(output_dir), _checkpoint_ids(output_dir))


def _history_files(output_dir: Path) -> set[str]:
    return {p.name for p in (output_dir / CONFIG_HISTORY_SUBDIR).glob("config-*.yaml")}


def _checkpoint_ids(output_dir: Path) -> set[tuple[str, int]]:
    folder = output_dir / CHECKPOINTS_SUBDIR
    return {(p.name, p.stat().st_ino) for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def undo_failed_resume() -> None:
    """After a resumed run failed (an error or Ctrl-C): if it saved no checkpoint, its settings
    never trained anything, so the run's config.yaml is put back as it was and the copy that
    start_run moved to config_history/ is removed; the next resume then compares with the settings
    the checkpoints really have. A run that saved a checkpoint keeps the new config.yaml: that
    checkpoint was trained with it. Does nothing when no resume was started in this process."""
    global _resumed_run
    if _resumed_run is None:
        return
    output_dir, old_text, history_before, checkpoints_before = _resumed_run
    _resumed_run = None
    try:
        if _checkpoint_ids(output_dir) - checkpoints_before:
            return
        path = output_dir / CONFIG_FILE
        if old_text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(old_text, encoding="utf-8")
        for name in _history_files(output_dir) - history_before:
            (output_dir / CONFIG_HISTORY_SUBDIR / name).unlink()
        with contextlib.suppress(OSError):  # only when empty: the history of earlier resumes stays
            (output_dir / CONFIG_HISTORY_SUBDIR).rmdir()
    except OSError as e:  # the run's own error is the one to report; this one is a warning
        logging.getLogger("posttrain.trainer").warning(
            "The resume failed, and restoring the run's previous %s failed too (%s): the previous one is the "
            "newest file in %s.", CONFIG_FILE, e, output_dir / CONFIG_HISTORY_SUBDIR)
        return
    logging.getLogger("posttrain.trainer").info(
        "The resume failed before saving a checkpoint: %s is as it was before it.", path)


def write_run_config(output_dir: Path, text: str, resumed: bool) -> None:
    """Write the run's config.yaml. A resumed run whose settings differ from the saved ones keeps
    the old file in config_history/ (numbered, oldest first) and warns with the changed keys, so
    the settings each part of the run trained with stay on record."""
    path = output_dir / CONFIG_FILE
    if resumed and path.is_file():
        old_text = path.read_text(encoding="utf-8", errors="replace")
        if old_text != text:
            history = output_dir / CONFIG_HISTORY_SUBDIR
            history.mkdir(exist_ok=True)
            kept = history / f"config-{len(list(history.glob('config-*.yaml'))) + 1:03d}.yaml"
            kept.write_text(old_text, encoding="utf-8")
            changes = config_changes(old_text, text)
            shown = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
            logging.getLogger("posttrain.trainer").warning(
                "Resuming with changed settings: %s. The previous config.yaml is kept as %s.",
                shown or "(formatting only)", kept)
    path.write_text(text, encoding="utf-8")


def config_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """``key: old -> new`` for every leaf option that differs between two config.yaml texts."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    try:
        old, new = flat(yaml.safe_load(old_yaml) or {}), flat(yaml.safe_load(new_yaml) or {})
    except yaml.YAMLError:
        return ["(the previous config.yaml is not valid YAML)"]
    missing = object()
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)]


class SkippedStepGuard:
    """Stops a run whose optimizer updates keep being skipped: a NaN/inf loss or gradient makes
    every update a no-op while the run would otherwise report progress and end "done".
    ``max_consecutive`` steps in a row with no update applied raise a PosttrainError (0: never)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def record(self, step: int, applied: bool) -> None:
        """After ``step``: ``applied`` is whether any of its optimizer updates was applied. Steps that
        attempt no update (no informative group under dynamic sampling, critic warm-up) are not recorded."""
        self.consecutive = 0 if applied else self.consecutive + 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise PosttrainError(
                f"Stopped at step {step}: the last {self.consecutive} steps skipped every optimizer update because "
                "the loss or gradient was not finite (NaN/inf), so the model has stopped learning. Usual causes: "
                "a learning rate too high (lower trainer.lr), float16 overflow (model.dtype=bfloat16 or float32), "
                "or non-finite rewards or data. metrics.jsonl shows where it began; the last checkpoint holds the "
                "weights from before. trainer.max_skipped_steps=0 disables this check."
            )


def due(step: int, every: int, last_step: int | None = None) -> bool:
    """Whether a periodic action (log, validate, checkpoint) runs after ``step``: every ``every``
    steps (0 = never), skipping ``last_step``, whose end-of-run action happens anyway."""
    return bool(every) and step % every == 0 and step != last_step


def log_small_data(rows: int, size: int, budget: int, budget_key: str, what: str, unit: str,
                   cross_epochs: bool) -> None:
    """Say what a step is when all the training data (``size`` ``unit`` in ``rows`` ``what``) is
    smaller than one step's ``budget``: one whole pass (steps end with their epoch), or the data
    repeated within the step (trainer.steps_cross_epochs=true), which trains many epochs per step."""
    if size >= budget:
        return
    data = f"{rows} training {what}" + (f" ({size} {unit})" if unit != what else "")
    if cross_epochs:
        logging.getLogger("posttrain.trainer").warning(
            "The %s are fewer than %s=%d, and trainer.steps_cross_epochs=true fills each step by repeating "
            "them: every step trains about %.3g epochs. Set trainer.steps_cross_epochs=false for one pass per "
            "step.", data, budget_key, budget, budget / size)
    else:
        logging.getLogger("posttrain.trainer").info(
            "The %s are fewer than %s=%d: each step is one pass over them, none repeated "
            "(trainer.steps_cross_epochs=true would fill each step by repeating them).", data, budget_key, budget)


def save_on_interrupt(completed: int, start_step: int, save_checkpoint, write) -> None:
    """Ctrl-C or SIGTERM (called while handling it): checkpoint the last whole step, if this
    process completed any."""
    # SIGTERM usually means a scheduler's grace period is running: say so, and that a second one kills.
    why = ("stopped by SIGTERM (a second SIGTERM ends the process at once)"
           if isinstance(sys.exc_info()[1], Terminated) else "interrupted")
    if completed > start_step:
        write(f"{why}: saving a checkpoint at the last completed step ({completed})")
        save_checkpoint()
    else:
        write(f"{why} before a step completed: no new checkpoint to save")


def resolve_output_dir(output_dir: str, resume_ckpt: Path | None, command: str) -> Path:
    """The run folder: as configured, else the resumed run's, else runs/<command>-<timestamp>."""
    if output_dir:
        return Path(output_dir)
    if resume_ckpt is not None:
        return resume_ckpt.parent.parent  # <run>/checkpoints/step_N
    return Path("runs") / f"{command}-{datetime.now():%Y%m%d-%H%M%S}"


class _RunLogFormatter(logging.Formatter):
    """Console lines (progress.CONSOLE_LOGGER) as printed after the time; other records with
    their level and logger name, as the console shows them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == CONSOLE_LOGGER:
            return f"{self.formatTime(record)} {record.getMessage()}"
        return super().format(record)


class _RunLogHandler(logging.FileHandler):
    """train.log. When a write fails (disk full), logging would print a traceback for every
    record; this says so once, and the console log goes on."""

    _failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if not self._failed:
            self._failed = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); "
                             "the log goes on on the console only\n")

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        try:
            super().close()  # closing the file flushes its buffer once more
        except OSError:
            self.handleError(None)


def log_to_file(path: Path) -> None:
    """Write posttrain's log records and the console's lines (steps, validation, checkpoints) to
    ``path`` (the run's train.log). Replaces the train.log handler of an earlier run in this
    process, which would otherwise receive this run's lines too."""
    loggers = [logging.getLogger("posttrain"), logging.getLogger(CONSOLE_LOGGER)]
    _close_run_log()
    handler = _RunLogHandler(path)
    handler.posttrain_run_log = True
    handler.setFormatter(_RunLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for log in loggers:
        log.addHandler(handler)


def _close_run_log() -> None:
    """Detach and close the train.log handler of this process's run, if any."""
    for log in (logging.getLogger("posttrain"), logging.getLogger(CONSOLE_LOGGER)):
        for old in [h for h in log.handlers if getattr(h, "posttrain_run_log", False)]:
            log.removeHandler(old)
            old.close()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values.detach().float() * mask).sum() / mask.sum().clamp(min=1))
