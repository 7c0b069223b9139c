"""rollout.mode=async with cluster.backend=ray end to end on CPU: a local Ray, two engine replica
actors, weights over a gloo broadcast. A replica killed mid-run is restarted and the run completes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from helpers import save_tiny_model  # noqa: E402
from posttrain.cli import main  # noqa: E402
from test_grpo_e2e import read_metrics, tiny_run_args  # noqa: E402

RAY_ARGS = ("rollout.mode=async", "cluster.backend=ray", "rollout.num_replicas=2", "rollout.backend=hf",
            "sync.mode=broadcast", "cluster.num_cpus=4", "cluster.wait_timeout_s=180")


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def replica_pids() -> list[int]:
    """Processes of live EngineReplica actors (Ray titles its workers ray::<Class>[.<method>])."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::EngineReplica"):
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("staleness", [1, 2])
def test_ray_replicas_run_async_grpo_to_completion(tmp_path, staleness):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    assert main(tiny_run_args(model_dir, out, 3, *RAY_ARGS, f"rollout.max_staleness={staleness}")) == 0
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    for m in metrics.values():
        assert m["off_policy/staleness_max"] <= staleness
        assert m["sync/bytes"] > 0  # every step's weights went out over the broadcast group


def test_a_killed_replica_is_restarted_and_the_run_completes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_one_after_step_one() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and '"step": 1' in metrics.read_text():
                pids = replica_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_after_step_one, daemon=True)
    watcher.start()
    assert main(tiny_run_args(model_dir, out, 5, *RAY_ARGS, "rollout.max_staleness=1")) == 0
    watcher.join(timeout=5)
    assert killed, "no replica process was found to kill"
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5]  # no step lost
    assert max(m["rollout/replica_restarts"] for m in metrics.values()) >= 1
