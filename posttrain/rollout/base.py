"""The rollout engine protocol: what the trainer needs from any generation backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """How to sample completions. ``top_k=0`` and ``top_p=1.0`` switch those filters off;
    ``temperature=0`` means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True  # return the logprob of each sampled token


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the policy's sampling
    distribution (logits divided by the temperature, before top-k/top-p filtering): the
    "old" logprobs of the PPO ratio.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt (given as token ids).

        Returns one list of ``n`` completions per prompt, in prompt order."""
        ...

    def update_weights(self, named_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Load new policy weights. Engines that share the trainer's modules ignore it."""
        ...
