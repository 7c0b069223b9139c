"""Rollout samples and their collation into padded training tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.models.logprobs import TokenBatch, make_token_batch


@dataclass
class Sample:
    """One scored completion, everything the policy update needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]  # from the rollout engine
    advantage: float
    reward: float
    ref_logprobs: list[float] | None = None


@dataclass
class TrainBatch:
    tokens: TokenBatch
    old_logprobs: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B,)
    ref_logprobs: torch.Tensor | None  # (B, R)


def _pad_rows(rows: list[list[float]], width: int, device: torch.device | str) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


def collate(samples: list[Sample], pad_token_id: int, device: torch.device | str) -> TrainBatch:
    tokens = make_token_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_token_id, device)
    width = tokens.response_len
    has_ref = samples[0].ref_logprobs is not None
    return TrainBatch(
        tokens=tokens,
        old_logprobs=_pad_rows([s.old_logprobs for s in samples], width, device),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        ref_logprobs=_pad_rows([s.ref_logprobs for s in samples], width, device) if has_ref else None,
    )


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
