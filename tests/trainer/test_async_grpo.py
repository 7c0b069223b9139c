"""rollout.mode=async end to end on CPU: K=0 reproduces the synchronous run, K=1/2 run to completion
within their staleness bound, and an async run resumes exactly from a checkpoint (with the
batches it had generated but not trained)."""

from __future__ import annotations

import json

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.trainer.async_rollouts import PENDING_ROLLOUTS_FILE
from test_grpo_e2e import read_metrics, tiny_run_args

LEARNING_KEYS = ("reward/mean", "loss/policy", "kl", "entropy", "grad_norm", "response/length_mean")


def assert_same_learning(a: dict, b: dict, steps) -> None:
    for step in steps:
        for key in LEARNING_KEYS:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


def test_max_staleness_zero_reproduces_the_synchronous_run(model_dir, tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    assert main(tiny_run_args(model_dir, sync, 3)) == 0
    assert main(tiny_run_args(model_dir, asyn, 3, "rollout.mode=async", "rollout.max_staleness=0")) == 0
    a, s = read_metrics(asyn), read_metrics(sync)
    assert sorted(a) == [1, 2, 3]
    assert_same_learning(a, s, [1, 2, 3])
    for step in (1, 2, 3):
        assert a[step]["off_policy/staleness_max"] == 0.0
        assert a[step]["off_policy/admitted_version"] == step - 1


@pytest.mark.parametrize("staleness", [1, 2])
def test_bounded_staleness_runs_to_completion_on_two_replicas(model_dir, tmp_path, staleness):
    out = tmp_path / f"k{staleness}"
    assert main(tiny_run_args(model_dir, out, 4, "rollout.mode=async", f"rollout.max_staleness={staleness}",
                              "rollout.num_replicas=2")) == 0
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    for step, m in metrics.items():
        assert 0 <= m["off_policy/staleness_max"] <= staleness
        # Admission control: the batch of step s starts only once version s - 1 - K is out.
        assert step - 1 - staleness <= m["off_policy/admitted_version"] <= step - 1
        assert m["rollout/replica_restarts"] == 0.0
        assert sum(v for k, v in m.items() if k.startswith("off_policy/staleness_hist/")) == pytest.approx(1.0)
    # Batch 2 is admitted before step 1 trains (nothing else holds it back), so it is one version old.
    assert metrics[2]["off_policy/admitted_version"] == 0
    assert metrics[2]["off_policy/staleness_max"] == 1
    assert (out / "checkpoints" / "step_000004").is_dir()


def test_async_resume_continues_with_the_pending_batches(model_dir, tmp_path):
    # hf replicas: a weight update waits for the running generate, so versions do not depend on timing.
    common = ("rollout.mode=async", "rollout.max_staleness=1", "rollout.backend=hf", "checkpoint.every=2",
              "checkpoint.keep_last=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny_run_args(model_dir, straight, 4, *common)) == 0
    ckpt = straight / "checkpoints" / "step_000002"
    assert (ckpt / PENDING_ROLLOUTS_FILE).is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert main([*tiny_run_args(model_dir, resumed, 4, *common), "--resume", str(ckpt)]) == 0
    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(b) == [3, 4]
    assert_same_learning(a, b, [3, 4])
    for step in (3, 4):
        assert a[step]["off_policy/admitted_version"] == b[step]["off_policy/admitted_version"]
        assert a[step]["off_policy/staleness_mean"] == b[step]["off_policy/staleness_mean"]


def test_async_config_errors_name_the_keys(model_dir, tmp_path, capsys):
    code = main(tiny_run_args(model_dir, tmp_path / "bad", 1, "rollout.mode=async", "env.num_workers=0",
                              "rollout.max_staleness=-1"))
    assert code == 2
    err = capsys.readouterr().err
    assert "env.num_workers" in err and "rollout.max_staleness=-1" in err
