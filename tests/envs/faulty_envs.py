"""Test-only environments for the reward pool: each sample says how to misbehave.

metadata["mode"]: "ok" (reward = metadata["value"]), "sleep" (never returns), "crash"
(os._exit(3) kills the worker), "raise" (ValueError), "raise_huge" (a ValueError of
metadata["size"] characters), "slow" (sleeps metadata["seconds"]).
Imported in spawned workers as ``envs.faulty_envs``: tests/ is on sys.path (tests/conftest.py)
and spawn children inherit the parent's sys.path.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog


class ScriptedEnv(Environment):
    def __init__(self, bonus: float = 0.0) -> None:
        self.bonus = bonus
        self.pid = os.getpid()

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        rewards = []
        for meta in metadata:
            mode = meta.get("mode", "ok")
            if mode == "sleep":
                while True:
                    time.sleep(60)
            if mode == "crash":
                os._exit(3)
            if mode == "raise":
                raise ValueError(f"boom {meta.get('value')}")
            if mode == "raise_huge":  # an exception message of meta["size"] characters
                raise ValueError("boom " + "x" * int(meta["size"]))
            if mode == "slow":
                time.sleep(meta["seconds"])
            rewards.append(float(meta.get("value", 0.0)) + self.bonus)
        n = len(rewards)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": f"pid {self.pid}"}] * n,
            metadata=[{**m, "worker_pid": self.pid} for m in metadata],
            next_stop_strings=[None] * n,
            rewards=torch.tensor(rewards),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=[str(m.get("value")) for m in metadata],
        )

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        return batch, {"mean_reward": float(batch["rewards"].mean()), "parent_pid": float(os.getpid())}


class BrokenOnceFlaggedEnv(ScriptedEnv):
    """ScriptedEnv that cannot be built once the file ``flag`` exists: replacement workers fail to start."""

    def __init__(self, flag: str) -> None:
        if os.path.exists(flag):
            raise RuntimeError("cannot build this environment any more")
        super().__init__()


class BrokenInitEnv(Environment):
    def __init__(self) -> None:
        raise RuntimeError("cannot build this environment")


class HugeInitErrorEnv(Environment):
    def __init__(self) -> None:
        raise RuntimeError("cannot build this environment " + "y" * 20_000_000)


class NotAnEnv:
    pass


def not_a_class() -> None:
    pass
