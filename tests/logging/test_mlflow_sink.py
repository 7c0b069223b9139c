"""The MLflow sink with a local file store: metrics, params and artifacts read back, resume."""

from __future__ import annotations

import math

import pytest

from posttrain.config.schema import LoggingConfig
from posttrain.errors import PosttrainError
from posttrain.logging import MetricsLogger
from posttrain.logging.mlflow_sink import MLFLOW_ID_FILE, flatten_params

mlflow = pytest.importorskip("mlflow")


def client_and_run(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    return client, (run_dir / MLFLOW_ID_FILE).read_text().strip()


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_metrics_params_and_config_reach_a_local_file_store(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer:\n  lr: 1.0e-06\n")
    cfg = LoggingConfig(mlflow=True, mlflow_experiment="tests")
    with MetricsLogger(tmp_path, cfg, {"trainer": {"lr": 1e-6, "max_steps": 3}, "seed": 1}) as logger:
        logger.log(1, {"reward/mean": 0.25, "grad_norm": float("nan"), "note": "text"})
        logger.log(2, {"reward/mean": 0.5})
        logger.log(2, {"reward_mean": 0.125}, prefix="val")
    client, run_id = client_and_run(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params == {"trainer.lr": "1e-06", "trainer.max_steps": "3", "seed": "1"}
    assert history(client, run_id, "reward/mean") == [(1, 0.25), (2, 0.5)]
    assert history(client, run_id, "val/reward_mean") == [(2, 0.125)]
    assert math.isnan(history(client, run_id, "grad_norm")[0][1])
    assert "note" not in run.data.metrics  # strings stay in metrics.jsonl
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_resume_continues_the_run_and_skips_logged_steps(tmp_path):
    cfg = LoggingConfig(mlflow=True)
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"x": float(step)})
    # Resumed from the checkpoint of step 2: step 3 comes again, then step 4.
    with MetricsLogger(tmp_path, cfg, {}, resume_step=2) as logger:
        logger.log(3, {"x": 30.0})
        logger.log(4, {"x": 4.0})
    client, run_id = client_and_run(tmp_path)
    assert history(client, run_id, "x") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_a_failed_run_is_marked_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with MetricsLogger(tmp_path, LoggingConfig(mlflow=True), {}) as logger:
            logger.log(1, {"x": 1.0})
            raise RuntimeError("boom")
    client, run_id = client_and_run(tmp_path)
    assert client.get_run(run_id).info.status == "FAILED"


def test_missing_mlflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)
    monkeypatch.setitem(__import__("sys").modules, "mlflow.tracking", None)
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[mlflow\]'"):
        MetricsLogger(tmp_path, LoggingConfig(mlflow=True), {})


def test_flatten_params_cuts_long_values():
    params = flatten_params({"a": {"b": [1, 2], "c": {}}, "d": "x" * 600})
    assert params == {"a.b": "[1, 2]", "a.c": "{}", "d": "x" * 500}
