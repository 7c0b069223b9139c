"""cluster.backend=process end to end: a synchronous GRPO run on a replica process learns as the
local run does (same metrics step by step), and an asynchronous one completes within its
staleness bound while a replica is killed mid-run and restarted."""

from __future__ import annotations

import os
import signal

from helpers import save_tiny_model
from test_async_grpo import assert_same_learning
from test_grpo_e2e import read_metrics, tiny_run_args

from posttrain.cli import main
from posttrain.cluster.process_pool import ProcessReplicaPool


def test_grpo_on_replica_processes_sync_equals_the_local_run_and_async_completes(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    local, on_processes, asyn = tmp_path / "local", tmp_path / "processes", tmp_path / "async"
    assert main(tiny_run_args(model_dir, local, 2)) == 0
    assert main(tiny_run_args(model_dir, on_processes, 2, "cluster.backend=process")) == 0
    assert_same_learning(read_metrics(on_processes), read_metrics(local), [1, 2])

    original, calls = ProcessReplicaPool.generate, []

    def kill_before_the_third_batch(pool, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-run: the replica dies, the batch must still come back
            os.kill(pool.replicas[0].process.pid, signal.SIGKILL)
        return original(pool, *args, **kwargs)

    monkeypatch.setattr(ProcessReplicaPool, "generate", kill_before_the_third_batch)
    assert main(tiny_run_args(model_dir, asyn, 4, "cluster.backend=process", "rollout.mode=async",
                              "rollout.max_staleness=1")) == 0
    metrics = read_metrics(asyn)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(m["off_policy/staleness_max"] <= 1 for m in metrics.values())
    assert max(m["rollout/replica_restarts"] for m in metrics.values()) == 1.0
