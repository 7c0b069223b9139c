"""Rollout samples and their collation into padded training tensors."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from posttrain.data.packing import pack_documents
from posttrain.errors import PosttrainError
from posttrain.models.logprobs import (
    TokenBatch,
    lay_out_per_token,
    make_packed_token_batch,
    make_token_batch,
    to_device,
)
from posttrain.models.moe.hf_blocks import GroupedMoE, use_grouped_experts


@dataclass
class Sample:
    """One scored completion, everything the policy update needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]  # from the rollout engine
    advantage: float | list[float]  # one per sequence, or one per response token
    reward: float
    ref_logprobs: list[float] | None = None
    trainable: bool = True  # False: the loss mask of every token is 0 (e.g. DAPO's truncated-sample masking)
    # The engine's logprobs when old_logprobs were recomputed by the trainer (truncated IS correction).
    rollout_logprobs: list[float] | None = None
    # Per response token: 1 for the model's own tokens, 0 for tokens it did not generate (the
    # observations of a multi-turn episode). None: every response token is the model's.
    response_mask: list[int] | None = None
    # Per response token, set by policy_update(record_tokens=...) for the samples written to samples.jsonl.
    trainer_logprobs: list[float] | None = None
    entropy: list[float] | None = None
    # MoE rollouts of posttrain's engine: its Completion.routed_experts, the top-k expert ids of every
    # MoE layer for each token it ran, int16 (moe_layers, len(prompt_ids) + len(response_ids) - 1, k).
    # Replayed by the old-logprob and training forwards (moe.router_replay). None: no routes.
    routed_experts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt and response tokens: what the sample costs in a forward pass."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Response tokens the loss sees (when trainable)."""
        return len(self.response_ids) if self.response_mask is None else int(sum(self.response_mask))


@dataclass
class TrainBatch:
    tokens: TokenBatch
    old_logprobs: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R), 0 on padding
    ref_logprobs: torch.Tensor | None  # (B, R)
    loss_mask: torch.Tensor  # (B, R): tokens.response_mask, zero on untrainable rows and non-model tokens
    rollout_logprobs: torch.Tensor | None = None  # (B, R)
    # collate(routes=True) and every sample carries routes: per MoE layer the engine's expert ids
    # (rows x width, k) int16, laid out like tokens.input_ids flattened (padding: expert 0).
    routes: list[torch.Tensor] | None = None


def pad_rows(rows: list[list[float]], width: int, device: torch.device | str) -> torch.Tensor:
    """(len(rows), width) float32, each row right-padded with zeros. One conversion of all values,
    in numpy (a tensor per row costs more than the values themselves at RL batch sizes)."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    out = np.zeros((len(rows), width), dtype=np.float32)
    out[np.arange(width)[None, :] < lengths[:, None]] = np.fromiter(chain.from_iterable(rows), np.float32)
    return to_device(torch.from_numpy(out), device)


def token_masks(samples: list[Sample], width: int) -> torch.Tensor:
    """(B, width) float: each sample's ``response_mask`` (all ones when None), 0 beyond its length."""
    return pad_rows([s.response_mask if s.response_mask is not None else [1.0] * len(s.response_ids)
                     for s in samples], width, "cpu")


def collate(samples: list[Sample], pad_token_id: int, device: torch.device | str, packed: bool = False,
            row_tokens: int = 0, routes: bool = False) -> TrainBatch:
    """``packed``: the samples are packed into rows of at most ``row_tokens`` tokens (first-fit
    decreasing; 0: all in one row) with restarting position ids (``make_packed_token_batch``), else
    one right-padded row per sample. The per-token tensors are (B, R) per sample either way.
    ``routes``: also lay out the samples' engine routes (``TrainBatch.routes``, see
    :func:`routes_like_tokens`) when every sample carries them."""
    prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    if packed:
        rows = pack_documents([s.num_tokens for s in samples], row_tokens) if row_tokens > 0 else None
        tokens = make_packed_token_batch(prompts, responses, pad_token_id, device, rows)
    else:
        tokens = make_token_batch(prompts, responses, pad_token_id, device)
    width = tokens.response_len
    has_ref = samples[0].ref_logprobs is not None
    return TrainBatch(
        tokens=tokens,
        old_logprobs=pad_rows([s.old_logprobs for s in samples], width, device),
        advantages=pad_rows([_per_token(s.advantage, len(s.response_ids)) for s in samples], width, device),
        ref_logprobs=pad_rows([s.ref_logprobs for s in samples], width, device) if has_ref else None,
        loss_mask=_loss_mask(samples, tokens.response_mask, device),
        rollout_logprobs=(
            pad_rows([s.rollout_logprobs for s in samples], width, device) if samples[0].rollout_logprobs is not None else None
        ),
        routes=routes_like_tokens(samples, tokens, device) if routes else None,
    )


def grouped_moe_for_routes(model: torch.nn.Module, samples: list[Sample]) -> GroupedMoE | None:
    """The policy's MoE blocks on grouped experts (swapped now if the engine has not already: same
    outputs and gradients) when some sample carries engine routes, else None (dense policies, and
    rollouts of other backends)."""
    if not any(s.routed_experts is not None for s in samples):
        return None
    moe = use_grouped_experts(model)
    return moe if moe.num_layers else None


def routes_like_tokens(samples: list[Sample], tokens: TokenBatch, device: torch.device | str) -> list[torch.Tensor] | None:
    """The samples' ``routed_experts`` laid out like ``tokens`` (padded or packed rows): per MoE
    layer a ``(rows x width, k)`` int16 tensor on ``device``, row ``r * width + c`` the expert ids of
    the token at row r, column c, the flattening an MoE block sees. Positions without a route
    (padding, and each sample's last token, which the engine never ran and whose routing changes
    none of its logprobs) get expert 0. None when a sample carries no routes."""
    if not samples or any(s.routed_experts is None for s in samples):
        return None
    per_token = []
    for s in samples:
        layers, rows, k = s.routed_experts.shape
        if not s.num_tokens - 1 <= rows <= s.num_tokens or (layers, k) != samples[0].routed_experts.shape[::2]:
            raise PosttrainError(
                f"routed_experts of shape {tuple(s.routed_experts.shape)} for a sample of {s.num_tokens} tokens; "
                f"expected ({samples[0].routed_experts.shape[0]}, {s.num_tokens - 1}, "
                f"{samples[0].routed_experts.shape[2]}): MoE layers, the tokens the engine ran, top-k.")
        per_token.append(s.routed_experts.transpose(0, 1))  # (tokens, layers, k)
    laid = lay_out_per_token(tokens, per_token)  # (rows, width, layers, k)
    flat = laid.permute(2, 0, 1, 3).reshape(laid.shape[2], -1, laid.shape[3])
    return list(to_device(flat.contiguous(), device).unbind(0))


def _loss_mask(samples: list[Sample], response_mask: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    mask = response_mask * to_device(torch.tensor([[float(s.trainable)] for s in samples]), device)
    if any(s.response_mask is not None for s in samples):  # single-turn batches skip this: same tensors as before
        mask = mask * to_device(token_masks(samples, mask.shape[1]), device)
    return mask


def _per_token(advantage: float | list[float], length: int) -> list[float]:
    return [float(advantage)] * length if isinstance(advantage, (int, float)) else list(advantage)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def logprob_mismatch_metrics(samples: list[Sample]) -> dict[str, float]:
    """The engine/trainer logprob difference over trained tokens (``rollout_logprobs`` against
    ``old_logprobs``): ``rollout/logprob_mismatch_mean`` and ``_max``. A growing mismatch is a
    known cause of RL collapse."""
    total, count, worst = 0.0, 0, 0.0
    for s in samples:
        mask = s.response_mask if s.response_mask is not None else [1] * len(s.old_logprobs)
        diffs = [abs(a - b) for a, b, m in zip(s.rollout_logprobs, s.old_logprobs, mask) if m]
        total, count = total + sum(diffs), count + len(diffs)
        worst = max([worst, *diffs])
    return {"rollout/logprob_mismatch_mean": total / max(count, 1), "rollout/logprob_mismatch_max": worst}

