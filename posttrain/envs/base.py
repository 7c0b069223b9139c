"""The environment interface (as in NeMo RL): environments only compute rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# One conversation: [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]
MessageLog = list[dict[str, Any]]


@dataclass
class EnvironmentReturn:
    """What ``Environment.step`` returns for a batch of B conversations.

    observations: B messages to append to each conversation (e.g. ``{"role": "environment",
        "content": "correct"}``); ignored for terminated conversations.
    metadata: B per-sample metadata dicts carried to the next turn (or None).
    next_stop_strings: B lists of stop strings for the next turn (or None: defaults).
    rewards: (B,) float tensor.
    terminateds: (B,) bool tensor; True ends the episode.
    answers: B extracted answers (or None), for logging.
    """

    observations: list[dict[str, Any]]
    metadata: list[dict[str, Any] | None]
    next_stop_strings: list[list[str] | None]
    rewards: torch.Tensor
    terminateds: torch.Tensor
    answers: list[str | None]

    @classmethod
    def final(
        cls,
        rewards: list[float],
        *,
        observations: list[dict[str, Any]],
        metadata: list[dict[str, Any] | None],
        answers: list[str | None],
    ) -> "EnvironmentReturn":
        """A return that ends every episode (single-turn scoring): no next stop strings."""
        n = len(rewards)
        return cls(
            observations=observations,
            metadata=metadata,
            next_stop_strings=[None] * n,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminateds=torch.ones(n, dtype=torch.bool),
            answers=answers,
        )


class Environment:
    """Base class of reward environments.

    Subclasses implement ``step``; the constructor takes only keyword arguments from
    ``env.kwargs`` in the config. Instances live in worker processes, so they must not rely on
    state shared with the trainer.
    """

    #: Metadata keys every prompt row must carry (e.g. ``("expected_answer",)``, the reference
    #: answer). The trainer checks all training and validation rows right after loading the
    #: data and stops with a ConfigError if a key is missing (or None), instead of scoring
    #: every sample 0. A row's metadata is every column except the prompt/messages column,
    #: plus ``expected_answer`` copied from ``data.answer_column``.
    required_metadata: tuple[str, ...] = ()

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        raise NotImplementedError

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Called once per step in the trainer process with the whole scored batch
        (keys: ``rewards`` (N,) tensor, ``message_logs``, ``metadata``, ``answers``, ...).
        Returns the (possibly modified) batch and extra metrics to log."""
        return batch, {}
