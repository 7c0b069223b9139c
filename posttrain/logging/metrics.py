"""Metric sinks: JSONL (always), TensorBoard, Weights & Biases and MLflow (opt-in), console lines.

``<output_dir>/metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call,
``{"step": 3, "timestamp": 1718000000.0, "reward/mean": 0.43, ...}``, flushed line by line
so a crash loses nothing that was logged. Every line is strict JSON (RFC 8259, which has no
NaN or Infinity): a non-finite value is written as ``null`` and the line counts them in
``nonfinite_metrics`` (the other sinks get the values as they are).

On resume (``resume_step`` given), lines of steps after ``resume_step`` are dropped so the
file matches that of an uninterrupted run; TensorBoard purges its events after that step the
same way. W&B keeps its own history: a resumed W&B run continues under the same id and
ignores steps it has already seen; MLflow likewise continues its run (id in mlflow_run_id.txt) and
skips the steps that run already holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.config.schema import LoggingConfig
from posttrain.errors import PosttrainError, write_failure
from posttrain.logging.mlflow_sink import MLflowSink
from posttrain.logging.run_files import read_step_records, warn_skipped_lines

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"

# Console line: (short name, metric keys tried in order, unit suffix). The aliases let the
# console line work whether a trainer logs "kl" or "loss/kl".
_CONSOLE_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("reward", ("reward/mean",), ""),
    ("acc", ("reward/accuracy", "rewards/accuracy"), ""),
    ("margin", ("rewards/margins",), ""),
    ("len", ("response/length_mean",), ""),
    ("loss", ("loss/policy", "loss"), ""),
    ("kl", ("kl", "loss/kl", "actor/kl"), ""),
    ("ent", ("entropy", "actor/entropy", "loss/entropy"), ""),
    ("gnorm", ("grad_norm", "optim/grad_norm"), ""),
    ("lr", ("lr", "optim/lr"), ""),
    ("tok/s", ("perf/tokens_per_s",), ""),
    ("time", ("time/step",), "s"),
)


class MetricsLogger:
    """Writes metrics to metrics.jsonl and, when enabled, TensorBoard, W&B and MLflow.

    Use as a context manager or call :meth:`close`. TensorBoard, W&B and MLflow are set up here,
    not at the first ``log``, so a missing package fails before any training work.
    """

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, run_config: dict,
                 resume_step: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.path = self.output_dir / METRICS_FILE
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            # A crash mid-line (without resume truncation) must not glue two records together.
            self._file.write("\n")
        self._tb_writer: Any = None
        self._wandb_run: Any = None
        self._mlflow: MLflowSink | None = None
        self._closed = False
        try:
            if cfg.tensorboard:
                self._tb_writer = _open_tensorboard(self.output_dir / TENSORBOARD_SUBDIR, resume_step)
            if cfg.wandb:
                self._wandb_run = _open_wandb(self.output_dir, cfg, run_config)
            if cfg.mlflow:
                self._mlflow = MLflowSink(self.output_dir, cfg, run_config)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Record ``metrics`` at ``step`` in every sink.

        Values may be Python numbers, 0-d tensors or NumPy scalars (converted to float);
        strings are kept in JSONL and W&B only. ``prefix`` ("val" or "val/") is prepended
        to every key with a single slash.
        """
        if self._closed:
            raise RuntimeError("MetricsLogger.log() called after close().")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        values = {f"{prefix}{key}": _to_scalar(key, value) for key, value in metrics.items()}
        record = {"step": int(step), "timestamp": time.time(), **values}
        try:
            self._file.write(strict_json_line(record))
            self._file.flush()
        except OSError as exc:  # a full disk: name the file and the free space, not a bare errno
            raise write_failure(exc, self.path, f"metrics of step {step}") from exc
        if self._tb_writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb_writer.add_scalar(key, value, global_step=step)
            self._tb_writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        if self._mlflow is not None:
            self._mlflow.log(int(step), values, record["timestamp"])

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink (idempotent). ``failed`` marks the W&B run as crashed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        except OSError:
            if not failed:  # after a failed write (disk full) its error is the one to report
                raise
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1 if failed else 0)
        if self._mlflow is not None:
            self._mlflow.close(failed)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


def format_console_line(step: int, max_steps: int, metrics: Mapping[str, Any]) -> str:
    """One compact line of the key metrics present, in a fixed order, e.g.
    ``step  12/100 | reward 0.431 | acc 0.31 | len 87.2 | loss -0.0123 | lr 1e-05 | time 2.31s``."""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}"]
    for short, keys, unit in _CONSOLE_FIELDS:
        for key in keys:
            if key in metrics:
                value = _to_scalar(key, metrics[key])
                if isinstance(value, (int, float)):
                    parts.append(f"{short} {_format_number(value)}{unit}")
                break
    return " | ".join(parts)


def _format_number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"  # throughputs read better as integers than as 1.234e+04
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3g}"


def _to_scalar(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, str)):
        return value
    item = getattr(value, "item", None)  # torch tensors, NumPy scalars and 0-d arrays
    if callable(item):
        try:
            result = item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"Metric '{key}' must be a scalar, got {type(value).__name__} with more than one element.") from exc
        return float(result) if isinstance(result, (int, float)) else result
    raise TypeError(f"Metric '{key}' must be a number, got {type(value).__name__}.")


def strict_json_line(record: Mapping[str, Any]) -> str:
    """``record`` as one line of strict JSON: non-finite floats become null, and their count is
    added as ``nonfinite_metrics`` so a NaN loss is still visible in the file."""
    nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        record = {**{k: (None if k in nonfinite else v) for k, v in record.items()},
                  "nonfinite_metrics": len(nonfinite)}
    return json.dumps(record, allow_nan=False) + "\n"


def truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop lines with step > resume_step by an atomic rewrite. Unreadable lines (not UTF-8, not
    JSON, no integer step) are dropped too, each named with its line number in one warning: they
    must not stop a resume, and no reader could use them."""
    if not path.exists():
        return
    records, problems = read_step_records(path)
    warn_skipped_lines(path, problems, logging.getLogger("posttrain.logging"), "the resume drops them from the file")
    # strict_json_line also repairs NaN tokens older versions wrote.
    kept = [strict_json_line(record) for record in records if record["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _open_tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
    except ImportError as exc:
        raise PosttrainError(
            "logging.tensorboard=true needs the tensorboard package: install it with "
            f"`pip install tensorboard`, or set logging.tensorboard=false. ({exc})"
        ) from exc
    try:
        # purge_step hides events a previous, interrupted run wrote after the resume point.
        purge_step = resume_step + 1 if resume_step is not None else None
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    except Exception as exc:
        raise PosttrainError(
            f"Could not open TensorBoard event files in '{log_dir}': {exc}. "
            "Fix the folder's permissions or set logging.tensorboard=false."
        ) from exc


def _open_wandb(output_dir: Path, cfg: LoggingConfig, run_config: dict) -> Any:
    try:
        import wandb  # optional: the wandb extra
    except ImportError as exc:
        raise PosttrainError(
            "logging.wandb=true needs the wandb package: install it with `pip install wandb`, "
            f"or set logging.wandb=false. ({exc})"
        ) from exc
    # A stable id per run folder lets a resumed run continue the same W&B run.
    id_file = output_dir / WANDB_ID_FILE
    if id_file.is_file() and id_file.read_text().strip():
        run_id = id_file.read_text().strip()
    else:
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        id_file.write_text(run_id + "\n")
    try:
        return wandb.init(
            project=cfg.wandb_project,
            mode=cfg.wandb_mode,
            name=cfg.wandb_run_name or output_dir.resolve().name,
            dir=str(output_dir),
            config=run_config,
            id=run_id,
            resume="allow",
            # create_new: several loggers in one process (tests, sweeps) get separate runs.
            reinit="create_new",
        )
    except Exception as exc:
        hint = (
            "log in with `wandb login` or use logging.wandb_mode=offline"
            if cfg.wandb_mode == "online" else "check the wandb installation"
        )
        raise PosttrainError(
            f"Could not start Weights & Biases (logging.wandb=true, mode {cfg.wandb_mode!r}): {exc}. "
            f"Set logging.wandb=false to train without it, or {hint}."
        ) from exc
