"""Toy reward environments for trainer tests (importable by spawned reward workers via sys.path)."""

from __future__ import annotations

import torch

from posttrain.envs.base import Environment, EnvironmentReturn


class DigitFractionEnv(Environment):
    """Reward = fraction of the response's characters that are digits: trivially learnable."""

    def __init__(self, bonus: float = 0.0) -> None:
        self.bonus = bonus

    def step(self, message_log_batch, metadata):
        rewards = []
        for log in message_log_batch:
            text = log[-1]["content"]
            rewards.append(sum(ch.isdigit() for ch in text) / max(len(text), 1) + self.bonus)
        n = len(message_log_batch)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": ""}] * n,
            metadata=[dict(m) for m in metadata],
            next_stop_strings=[None] * n,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=[None] * n,
        )


class SomeGroupsConstantEnv(Environment):
    """Reward 1 for every completion of prompts with an even number of characters (their groups are
    uniform: dynamic sampling drops them), else the response length / 100 (groups almost surely differ)."""

    def step(self, message_log_batch, metadata):
        rewards = []
        for log in message_log_batch:
            prompt, text = log[-2]["content"], log[-1]["content"]
            rewards.append(1.0 if len(prompt) % 2 == 0 else len(text) / 100)
        n = len(message_log_batch)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": ""}] * n,
            metadata=[dict(m) for m in metadata],
            next_stop_strings=[None] * n,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=[None] * n,
        )


class RandomRewardEnv(DigitFractionEnv):
    """Reward drawn uniformly from [0, 1) per completion: every group's rewards differ (almost surely), so
    every step moves the weights, whatever the sampled text (tests that assert the weights changed)."""

    def step(self, message_log_batch, metadata):
        ret = super().step(message_log_batch, metadata)
        ret.rewards = torch.rand(len(message_log_batch))
        return ret


class ConstantEnv(DigitFractionEnv):
    """Reward 0.5 for everything: every group is uniform."""

    def step(self, message_log_batch, metadata):
        ret = super().step(message_log_batch, metadata)
        ret.rewards = torch.full_like(ret.rewards, 0.5)
        return ret


class _FixedRewardEnv(Environment):
    """Reward ``reward`` for everything; records which environment scored each row (``scored_by``)
    so that tests can check the routing of a multi-task pool."""

    name = ""

    def __init__(self, reward: float = 1.0) -> None:
        self.reward = reward

    def step(self, message_log_batch, metadata):
        n = len(message_log_batch)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": ""}] * n,
            metadata=[{**m, "scored_by": self.name, "correct": self.reward >= 1.0} for m in metadata],
            next_stop_strings=[None] * n,
            rewards=torch.full((n,), self.reward, dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=[self.name] * n,
        )

    def global_post_process_and_metrics(self, batch):
        correct = [bool(m.get("correct")) for m in batch["metadata"]]
        scored_by = {m.get("scored_by") for m in batch["metadata"]}
        assert scored_by == {self.name}, f"{self.name} got rows scored by {scored_by}"
        return batch, {"accuracy": sum(correct) / max(len(correct), 1), "rows": float(len(correct))}


class TaskAEnv(_FixedRewardEnv):
    """Multi-task toy A: constant reward (default 1.0)."""

    name = "A"


class TaskBEnv(_FixedRewardEnv):
    """Multi-task toy B: constant reward; its rows must carry a ``keyword``."""

    name = "B"
    required_metadata = ("keyword",)
