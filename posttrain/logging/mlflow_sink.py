"""The MLflow sink of :class:`posttrain.logging.metrics.MetricsLogger` (``logging.mlflow=true``).

One MLflow run per run folder: numeric metrics by step, the config as flattened params
(``trainer.lr``), and config.yaml as an artifact. The default tracking URI is a local file
store, ``file:<output_dir>/mlruns``; ``mlflow ui --backend-store-uri <output_dir>/mlruns`` shows
it. Uses ``MlflowClient`` rather than ``mlflow.start_run``, so several runs in one process (tests,
sweeps) do not share MLflow's global active run.

MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set ("maintenance mode"); for
a ``file:`` URI it is set here when the user has not set it, since a file store in the run
folder is what a local run wants. Needs ``pip install 'posttrain[mlflow]'`` (mlflow-skinny).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.config.schema import LoggingConfig
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.logging")

MLFLOW_ID_FILE = "mlflow_run_id.txt"
# MLflow's limits: values of a param (older servers: 500 characters), entries per log_batch call.
_MAX_PARAM_CHARS = 500
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow keys: alphanumerics, _ - . space /


class MLflowSink:
    """Logs to one MLflow run; a resumed run folder continues its run (id in mlflow_run_id.txt)
    and skips steps that run already holds, as W&B does."""

    def __init__(self, output_dir: Path, cfg: LoggingConfig, run_config: Mapping[str, Any]) -> None:
        self.uri = cfg.mlflow_tracking_uri or (output_dir.resolve() / "mlruns").as_uri()
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param  # optional: the mlflow extra
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise PosttrainError(
                "logging.mlflow=true needs MLflow: install it with `pip install 'posttrain[mlflow]'` "
                f"(or `pip install mlflow-skinny`), or set logging.mlflow=false. ({exc})"
            ) from exc
        self._metric, self._failures = Metric, 0
        self._last_logged_step = -1  # steps up to this one are already in the (resumed) run
        id_file = output_dir / MLFLOW_ID_FILE
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._existing_run(id_file.read_text().strip() if id_file.is_file() else "")
            if self.run_id:
                self.client.update_run(self.run_id, status="RUNNING")
                self._last_logged_step = self._max_logged_step()
            else:
                experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(cfg.mlflow_experiment))
                run = self.client.create_run(experiment_id, run_name=output_dir.resolve().name,
                                             tags={"posttrain.run_dir": str(output_dir.resolve())})
                self.run_id = run.info.run_id
                id_file.write_text(self.run_id + "\n")
                params = [Param(key, value) for key, value in flatten_params(run_config).items()]
                for i in range(0, len(params), _PARAMS_PER_BATCH):
                    self.client.log_batch(self.run_id, params=params[i : i + _PARAMS_PER_BATCH])
                if (output_dir / "config.yaml").is_file():
                    self.client.log_artifact(self.run_id, str(output_dir / "config.yaml"))
        except PosttrainError:
            raise
        except Exception as exc:
            raise PosttrainError(
                f"Could not start MLflow (logging.mlflow=true, tracking URI {self.uri!r}): {exc}. Check "
                "logging.mlflow_tracking_uri (empty: a file store in the run folder), or set logging.mlflow=false."
            ) from exc

    def log(self, step: int, values: Mapping[str, Any], timestamp: float) -> None:
        """Numeric ``values`` at ``step``; strings are skipped (MLflow metrics are numbers). A
        failing tracking server warns (metrics.jsonl still has everything) instead of stopping training."""
        if step <= self._last_logged_step:
            return
        millis = int(timestamp * 1000)
        metrics = [self._metric(_INVALID_KEY_CHARS.sub("_", key), float(value), millis, step)
                   for key, value in values.items() if isinstance(value, (int, float))]
        try:
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + _METRICS_PER_BATCH])
        except Exception as exc:
            self._failures += 1
            if self._failures == 1:
                logger.warning("MLflow: logging step %d to %s failed (%s); training goes on, metrics.jsonl "
                               "has every metric.", step, self.uri, exc)

    def close(self, failed: bool = False) -> None:
        if self._failures:
            logger.warning("MLflow: %d log calls failed; metrics.jsonl has every metric.", self._failures)
        try:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        except Exception as exc:  # the run's own outcome matters more than its MLflow status
            logger.warning("MLflow: could not mark run %s as ended: %s", self.run_id, exc)

    def _existing_run(self, run_id: str) -> str:
        if not run_id:
            return ""
        try:
            self.client.get_run(run_id)
        except Exception:  # another tracking store, or the run was deleted: start a new one
            logger.warning("MLflow run %s (mlflow_run_id.txt) is not in %s; starting a new run.", run_id, self.uri)
            return ""
        return run_id

    def _max_logged_step(self) -> int:
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)), default=-1)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"lr": 1e-6}}`` -> ``{"trainer.lr": "1e-06"}``; long values are cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = _INVALID_KEY_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out
