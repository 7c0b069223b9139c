"""One sequence in the engine: its tokens, its KV blocks, its sampling state."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class SequenceSampling:
    """Per-sequence sampling settings, as the sampler reads them."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    generator: torch.Generator | None = None  # set for requests with a seed


_ids = itertools.count()


@dataclass
class Sequence:
    """``token_ids`` holds the prompt then the generated tokens. ``block_table`` lists the KV blocks
    holding positions ``[i * block_size, (i + 1) * block_size)``; the first ``num_cached_tokens``
    positions were found in the prefix cache and are not recomputed at prefill."""

    token_ids: list[int]
    sampling: SequenceSampling
    request_id: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)  # the engine's weight_version per generated token
    finish_reason: str | None = None
    routed_experts: torch.Tensor | None = None  # MoE, once finished: see Completion.routed_experts

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size
