"""Acceptance: a GRPO run fed by the rollout API from two environment processes.

Four processes besides the trainer: `posttrain rollout-api`, `posttrain serve` (a tiny model) and
two copies of examples/rollout_api_env/arithmetic_env.py, which generate through the server's
/generate, score with the math environment and submit groups. The trainer (rollout.source=api)
runs 2 steps; with max_staleness 0 every group left over from step 1 is dropped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from helpers import save_tiny_model  # noqa: E402
from posttrain.cli import main  # noqa: E402
from ports import start_server_process  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rollout_api_env" / "arithmetic_env.py"
GROUP_SIZE, NUM_GROUPS = 2, 4  # per step: rollout.batch_size = 8


def test_grpo_fed_by_two_environment_processes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "posttrain"]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("arith-a", "arith-b")}
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        procs.append(subprocess.Popen(args, env=env, stdout=logs[name], stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        # The servers pick their ports (again on another one if it was taken meanwhile).
        api_url, api = start_server_process(
            lambda port: [*cli, "rollout-api", "--port", str(port), "--max-queue-groups", "12", "--max-staleness", "0",
                          "--journal", str(tmp_path / "journal.jsonl")], tmp_path / "api.log", env=env, timeout_s=60)
        procs.append(api)
        server_url, serve = start_server_process(
            lambda port: [*cli, "serve", "--model", model_dir, "--port", str(port), "--device", "cpu"],
            tmp_path / "serve.log", env=env, timeout_s=60)
        procs.append(serve)
        for seed, name in enumerate(("arith-a", "arith-b")):
            start(name, [sys.executable, str(EXAMPLE), "--api", api_url, "--server", server_url, "--tokenizer", model_dir,
                         "--name", name, "--group-size", str(GROUP_SIZE), "--max-new-tokens", "6", "--difficulty", "1",
                         "--seed", str(seed)])
        # Before the trainer starts, each environment has 3 groups queued: step 1 takes 2 of each,
        # the rest (policy version 0) goes stale when the trainer posts version 1.
        deadline = time.monotonic() + 90
        while True:
            status = httpx.get(api_url + "/status", timeout=5).json()
            if all(status["envs"].get(n, {}).get("queued", 0) >= 3 for n in ("arith-a", "arith-b")):
                break
            assert time.monotonic() < deadline, status
            for p in procs:
                assert p.poll() is None, f"{p.args} exited with {p.returncode}"
            time.sleep(0.2)

        run_dir = tmp_path / "run"
        assert main([
            "grpo", f"model.path={model_dir}", f"trainer.output_dir={run_dir}", "trainer.max_steps=2",
            "rollout.source=api", f"rollout.api_url={api_url}", "rollout.api_timeout_s=90",
            f"rollout.batch_size={GROUP_SIZE * NUM_GROUPS}", f"rollout.group_size={GROUP_SIZE}",
            "rollout.max_new_tokens=6", "trainer.mini_batch_size=8", "trainer.micro_batch_size=4", "trainer.lr=1e-3",
            "algorithm.kl_coef=0.01", "data.arithmetic.num_train=8", "data.arithmetic.num_validation=2",
            "validation.at_start=false", "validation.at_end=false", "validation.every=0", "env.num_workers=0",
            "checkpoint.every=0", "logging.progress_bar=false", "model.device=cpu",
        ]) == 0

        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = {m["step"]: m for m in lines if "api/groups/arith-a" in m or "api/groups/arith-b" in m}
        assert sorted(steps) == [1, 2]
        assert steps[1]["api/groups/arith-a"] == 2 and steps[1]["api/groups/arith-b"] == 2
        assert steps[1]["api/staleness_mean"] == 0
        assert "reward/arith-a/mean" in steps[1] and "reward/arith-b/mean" in steps[1]
        for m in steps.values():
            assert sum(v for k, v in m.items() if k.startswith("api/groups/")) == NUM_GROUPS
        assert steps[2]["api/dropped_stale"] >= 2  # the leftovers of step 1, at least
        status = httpx.get(api_url + "/status", timeout=5).json()
        assert status["policy_version"] == 2 and status["consumed"] == 2 * NUM_GROUPS and status["leased"] == 0
        assert status["dropped_stale"] >= 2
        assert all(status["envs"][n]["dropped_stale"] + status["envs"][n]["consumed"] >= 1 for n in ("arith-a", "arith-b"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
