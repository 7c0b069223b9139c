"""The reward of bench/grpo_step.py, the same function for posttrain and for TRL.

Reward = fraction of the completion's characters that are digits (as tests/toy_envs.py's
DigitFractionEnv): cheap, deterministic, and the same work in both frameworks. posttrain loads
``grpo_step_env.DigitFractionEnv`` by import path (env.cls; bench/ is on sys.path, which the
spawned reward workers inherit); TRL gets ``digit_fraction_reward`` as a reward function.
"""

from __future__ import annotations

import torch

from posttrain.envs.base import Environment, EnvironmentReturn


def digit_fraction(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


class DigitFractionEnv(Environment):
    """posttrain's side: one-turn episodes scored by digit_fraction of the last message."""

    def step(self, message_log_batch, metadata):
        n = len(message_log_batch)
        return EnvironmentReturn(
            observations=[{"role": "environment", "content": ""}] * n,
            metadata=[dict(m) for m in metadata],
            next_stop_strings=[None] * n,
            rewards=torch.tensor([digit_fraction(log[-1]["content"]) for log in message_log_batch], dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=[None] * n,
        )


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """TRL's side: completions are strings, or (chat prompts) lists of messages."""
    return [digit_fraction(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
