"""Atomic checkpoints in Hugging Face format plus trainer state, keep-last-K, resume.

Layout of a run folder::

    <output_dir>/checkpoints/step_000010/
        config.json, model.safetensors, generation_config.json   (model.save_pretrained)
        tokenizer.json, tokenizer_config.json, ...                (tokenizer.save_pretrained)
        trainer_state.json                                        ({..., "step": 10})
        optimizer.pt, scheduler.pt                                (when given)
        rng_state.pt                                              (capture_rng_state())

LoRA runs write ``checkpoints/adapter_step_000010/`` instead (``prefix="adapter_step"``): the
adapter only (adapter_config.json, adapter_model.safetensors from peft's save_pretrained) plus
the same tokenizer and trainer state files. Listing, resolving and pruning accept both names.

Atomicity: a save writes everything into ``checkpoints/.tmp-step_000010-<pid>``, fsyncs it,
and only then renames it to ``step_000010``. A rename within one file system is atomic, so a
``step_*`` folder is either absent or complete; a crash or Ctrl-C (KeyboardInterrupt) during
the write deletes the temporary folder (or leaves it for the next manager to delete) and
never touches an existing checkpoint. Replacing an existing step folder takes two renames
(old aside to ``.old-*``, new into place); SIGINT and SIGTERM are deferred across them, and a manager
finding an ``.old-*`` folder without its ``step_*`` counterpart puts it back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posttrain.checkpoint.rng import capture_rng_state, restore_rng_state
from posttrain.checkpoint.validate import STATE_FILES_KEY, TRAINER_STATE_FILE, checkpoint_problems, trainer_state_problem
from posttrain.errors import PosttrainError, write_failure

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"

STEP_PREFIX = "step"
ADAPTER_STEP_PREFIX = "adapter_step"
_STEP_RE = re.compile(rf"^(?:{STEP_PREFIX}|{ADAPTER_STEP_PREFIX})_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def checkpoint_name(step: int, prefix: str = STEP_PREFIX) -> str:
    """Folder name of the checkpoint of ``step``: ``step_000010`` (``adapter_step_000010`` for LoRA)."""
    return f"{prefix}_{step:06d}"


class CheckpointManager:
    """Saves, lists, prunes and resolves the checkpoints of one run folder."""

    def __init__(self, output_dir: str | Path, keep_last: int, prefix: str = STEP_PREFIX) -> None:
        if keep_last < 0:
            raise PosttrainError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {keep_last}.")
        if prefix not in (STEP_PREFIX, ADAPTER_STEP_PREFIX):
            raise ValueError(f"checkpoint prefix must be {STEP_PREFIX!r} or {ADAPTER_STEP_PREFIX!r}, got {prefix!r}")
        self.prefix = prefix
        self.output_dir = Path(output_dir)
        self.checkpoints_dir = self.output_dir / CHECKPOINTS_SUBDIR
        self.keep_last = keep_last
        self._recover_leftovers()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, model: Any, tokenizer: Any, trainer_state: dict,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
             extra_files: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint of ``step`` atomically, prune old ones, return its folder.
        ``extra_files``: file name -> object written with torch.save (e.g. finished rollouts not
        trained yet), read back with :meth:`load_extra`.

        A write that fails (disk full, read-only folder, file size limit) removes the partial
        folder and raises a PosttrainError naming the folder and the free space; earlier
        checkpoints are never touched."""
        name = checkpoint_name(step, self.prefix)
        final_dir = self.checkpoints_dir / name
        tmp_dir = self.checkpoints_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        try:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
            tmp_dir.mkdir()
        except OSError as exc:
            raise write_failure(exc, tmp_dir, f"checkpoint of step {step}") from exc
        try:
            # trainer_state first: a non-serialisable value fails before the slow model write.
            saved_with = [name for name, obj in ((OPTIMIZER_FILE, optimizer), (SCHEDULER_FILE, scheduler)) if obj is not None]
            state = {**trainer_state, "step": step, STATE_FILES_KEY: saved_with}
            _write_bytes(tmp_dir / TRAINER_STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())
            # transformers >= 4.35 writes safetensors by default and 5.x only safetensors (it no
            # longer takes safe_serialization), so the default call is the safe one for both.
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            if optimizer is not None:
                _torch_save(optimizer.state_dict(), tmp_dir / OPTIMIZER_FILE)
            if scheduler is not None:
                _torch_save(scheduler.state_dict(), tmp_dir / SCHEDULER_FILE)
            _torch_save(capture_rng_state(), tmp_dir / RNG_FILE)
            for file_name, obj in (extra_files or {}).items():
                _torch_save(obj, tmp_dir / file_name)
            # The model files too: otherwise after a power loss the rename below could be
            # durable while the weights it points at are not.
            _fsync_tree(tmp_dir)
            self._commit(tmp_dir, final_dir)
        except BaseException as exc:
            # BaseException: Ctrl-C mid-save must not leave a temp folder behind either.
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if isinstance(exc, Exception) and _is_write_failure(exc):
                previous = self.latest()
                raise write_failure(exc, final_dir, f"checkpoint of step {step}",
                                    f"The previous checkpoint {previous} is intact." if previous else
                                    "No earlier checkpoint of this run exists.") from exc
            raise
        self._prune(keep=final_dir)
        return final_dir

    def _commit(self, tmp_dir: Path, final_dir: Path) -> None:
        with _defer_sigint():
            if final_dir.exists():
                # os.replace cannot replace a non-empty folder, so the old one moves aside first;
                # if we die between the two renames, _recover_leftovers puts it back.
                old_dir = self.checkpoints_dir / f"{_OLD_PREFIX}{final_dir.name}-{os.getpid()}"
                if old_dir.exists():
                    shutil.rmtree(old_dir)
                os.replace(final_dir, old_dir)
                try:
                    os.replace(tmp_dir, final_dir)
                except BaseException:
                    os.replace(old_dir, final_dir)  # put the good checkpoint back
                    raise
                _fsync_dir(self.checkpoints_dir)
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                os.replace(tmp_dir, final_dir)
                _fsync_dir(self.checkpoints_dir)

    def _prune(self, keep: Path) -> None:
        """Delete checkpoints beyond the newest ``keep_last``; never ``keep``."""
        if self.keep_last == 0:
            return
        checkpoints = self.list()
        for old in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            if old.resolve() == keep.resolve():
                continue
            # Rename first so a crash mid-delete leaves a .tmp-* folder (cleaned later), never
            # a half-deleted step_* folder that looks like a checkpoint.
            doomed = self.checkpoints_dir / f"{_TMP_PREFIX}delete-{old.name}-{os.getpid()}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _recover_leftovers(self) -> None:
        if not self.checkpoints_dir.is_dir():
            return
        for entry in self.checkpoints_dir.iterdir():
            if not entry.is_dir():
                continue
            if entry.name.startswith(_TMP_PREFIX):
                logger.info("Removing leftover of an interrupted checkpoint save: %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(_OLD_PREFIX):
                step_name = entry.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
                target = self.checkpoints_dir / step_name
                if _STEP_RE.match(step_name) and not target.exists():
                    logger.warning("Restoring checkpoint %s moved aside by an interrupted save.", target)
                    os.replace(entry, target)
                else:
                    shutil.rmtree(entry, ignore_errors=True)

    # ----------------------------------------------------------------- listing
    def list(self) -> list[Path]:
        """Complete checkpoint folders of this run, sorted by step (oldest first)."""
        return _list_checkpoints(self.checkpoints_dir)

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or None when there is none."""
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    @staticmethod
    def resolve(path: str | Path) -> Path:
        """A checkpoint folder from ``path``: a checkpoint folder itself (holds
        trainer_state.json), a run folder (its latest checkpoint) or a run's checkpoints/ folder.

        Every candidate is validated first (checkpoint/validate.py). A broken latest checkpoint of a
        run folder is skipped, with a warning naming the broken file, for the newest complete one;
        a checkpoint folder given itself must be complete (the error names the one to use instead)."""
        path = Path(path)
        if (path / TRAINER_STATE_FILE).is_file() or (_STEP_RE.match(path.name) and path.is_dir()):
            problems = checkpoint_problems(path)
            if not problems:
                return path
            siblings = [c for c in _list_checkpoints(path.parent) if c != path and not checkpoint_problems(c)]
            hint = (f" The newest complete checkpoint of this run is {siblings[-1]}: resume from it, or from the "
                    "run folder (which skips broken checkpoints)." if siblings else "")
            raise PosttrainError(f"Cannot resume from checkpoint '{path}': " + "; ".join(problems) + "." + hint)
        if path.is_dir():
            for folder in (path / CHECKPOINTS_SUBDIR, path):
                checkpoints = _list_checkpoints(folder)
                broken = []
                for ckpt in reversed(checkpoints):
                    problems = checkpoint_problems(ckpt)
                    if not problems:
                        for bad, why in broken:
                            logger.warning("Skipping checkpoint %s, which cannot be used: %s", bad, why)
                        if broken:
                            logger.warning("Resuming from %s, the newest complete checkpoint.", ckpt)
                        return ckpt
                    broken.append((ckpt, "; ".join(problems)))
                if broken:
                    raise PosttrainError(
                        f"Cannot resume from '{path}': none of its {len(broken)} checkpoints is complete. "
                        + " ".join(f"{bad.name}: {why}." for bad, why in broken)
                        + " Start a new run (without --resume), or from the weights of a checkpoint "
                        "that still has them (model.path=...)."
                    )
            problem = (f"'{path}' holds no {TRAINER_STATE_FILE} and no checkpoints under {CHECKPOINTS_SUBDIR}/step_* "
                       f"or {CHECKPOINTS_SUBDIR}/{ADAPTER_STEP_PREFIX}_*")
        elif path.exists():
            problem = f"'{path}' is a file, not a folder"
        else:
            problem = f"'{path}' does not exist"
        raise PosttrainError(
            f"Cannot resume from {problem}. Expected a checkpoint folder containing {TRAINER_STATE_FILE} "
            f"(e.g. runs/NAME/{CHECKPOINTS_SUBDIR}/step_000050) or a run folder with saved checkpoints."
        )

    # ----------------------------------------------------------------- loading
    @staticmethod
    def load_extra(ckpt_dir: str | Path, file_name: str) -> Any | None:
        """An object saved with ``save(extra_files=...)``; None when the checkpoint has no such file."""
        path = Path(ckpt_dir) / file_name
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # our own pickled rollouts
        except Exception as exc:
            raise PosttrainError(f"{path} is unreadable ({type(exc).__name__}: {exc}); delete it to resume "
                                 "without those pending rollouts (their prompts are then skipped).") from exc

    @staticmethod
    def load_trainer_state(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer | None = None,
                           scheduler: Any | None = None, map_location: str | torch.device = "cpu") -> dict:
        """Restore optimizer, scheduler (when given) and RNG states; return the trainer state.

        The model weights are not touched: load them with ``from_pretrained(ckpt_dir)`` (LoRA:
        ``models.loading.load_model_and_tokenizer(cfg, device, source=ckpt_dir)``).
        """
        ckpt_dir = Path(ckpt_dir)
        problem = trainer_state_problem(ckpt_dir)
        if problem is not None:
            raise PosttrainError(f"'{ckpt_dir}' is not a usable checkpoint: {TRAINER_STATE_FILE}: {problem}.")
        trainer_state = json.loads((ckpt_dir / TRAINER_STATE_FILE).read_bytes())
        saved_with = trainer_state.pop(STATE_FILES_KEY, None)  # bookkeeping of the checkpoint, not the recipe's
        if optimizer is not None:
            optimizer_file = ckpt_dir / OPTIMIZER_FILE
            if not optimizer_file.is_file() and isinstance(saved_with, list) and OPTIMIZER_FILE in saved_with:
                raise PosttrainError(
                    f"Checkpoint '{ckpt_dir}' was saved with {OPTIMIZER_FILE}, which is missing now (deleted or lost), "
                    "so training cannot resume from it exactly. Resume from the run folder (it uses the newest "
                    f"complete checkpoint), or start a new run from its weights (model.path={ckpt_dir})."
                )
            if not optimizer_file.is_file():
                raise PosttrainError(
                    f"Checkpoint '{ckpt_dir}' has no {OPTIMIZER_FILE}: it was saved with "
                    "checkpoint.save_optimizer=false, so training cannot resume from it exactly. "
                    f"Start a new run from its weights instead (model.path={ckpt_dir}), or save "
                    "future checkpoints with checkpoint.save_optimizer=true."
                )
            optimizer.load_state_dict(_torch_load(optimizer_file, map_location))
        if scheduler is not None:
            scheduler_file = ckpt_dir / SCHEDULER_FILE
            if scheduler_file.is_file():
                scheduler.load_state_dict(_torch_load(scheduler_file, map_location))
            else:
                logger.warning("Checkpoint %s has no %s; the learning-rate schedule restarts.", ckpt_dir, SCHEDULER_FILE)
        rng_file = ckpt_dir / RNG_FILE
        if rng_file.is_file():
            # RNG states must stay on the CPU whatever map_location says.
            restore_rng_state(_torch_load(rng_file, "cpu"))
        else:
            logger.warning("Checkpoint %s has no %s; random streams will differ from the original run.", ckpt_dir, RNG_FILE)
        return trainer_state


# --------------------------------------------------------------------- helpers
def _is_write_failure(exc: BaseException) -> bool:
    """An OSError anywhere in the chain, or safetensors' own error type (its Rust writer reports an
    I/O error as SafetensorError, not OSError); torch.save's zip writer raises RuntimeError with
    the OS message."""
    while exc is not None:
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            return True
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("write", "No space", "File too large")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _STEP_RE.match(entry.name)
        # trainer_state.json is written first, but folders only appear complete (atomic
        # rename); the check guards against folders users made or copied by hand.
        if match and (entry / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), entry.name, entry))
    return [entry for _, _, entry in sorted(found)]


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    # weights_only: loading a checkpoint must never execute code stored in it.
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PosttrainError(f"Cannot read checkpoint file '{path}': {exc}") from exc


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; not supported on every platform (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM for the few renames of a commit, then deliver the first one
    as its handler would have (a SIGTERM whose action is the default then ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received: list[Any] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signum, frame = received[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # usually KeyboardInterrupt, or Terminated for SIGTERM
            elif handler == signal.SIG_DFL and signum == signal.SIGTERM:
                signal.raise_signal(signum)  # the default action: the process ends now
            elif handler != signal.SIG_IGN:
                raise KeyboardInterrupt
