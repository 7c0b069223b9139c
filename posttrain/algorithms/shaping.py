"""Reward shaping and batch filtering from DAPO, as pure tensor functions.

DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv:2503.14476) adds to GRPO, besides clip-higher and the token-level loss (see
:mod:`posttrain.algorithms.losses`):

- *overlong reward shaping* (:func:`overlong_penalty`): a length penalty that grows linearly in
  the last ``buffer_len`` tokens before the generation limit, so the model learns to finish in
  time rather than being punished abruptly for truncation;
- *overlong filtering*: completions cut off at the limit are left out of the loss (the trainer
  zeroes their loss mask, ``algorithm.mask_truncated``);
- *dynamic sampling* (:func:`informative_groups`): groups whose completions all got the same
  reward have zero advantage and only dilute the batch; they are dropped and more prompts are
  sampled until the batch is full.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, to be added to the rewards.

    With ``L`` the response length and ``start = max_len - buffer_len``::

        0                                        if L <= start
        -penalty * (L - start) / buffer_len      if start < L <= max_len
        -penalty                                 if L > max_len

    Args:
        lengths: ``(N,)`` response lengths in tokens (int or float).
        max_len: the generation limit (``rollout.max_new_tokens``).
        buffer_len: the length of the penalty ramp in tokens, ``0 <= buffer_len <= max_len``;
            0 turns the penalty off (all zeros).
        penalty: the penalty at ``max_len``, ``>= 0``.

    Returns:
        ``(N,)`` float32 penalties in ``[-penalty, 0]``.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (N,), got shape {tuple(lengths.shape)}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in [0, max_len={max_len}], got {buffer_len}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    lengths = lengths.to(torch.float32)
    if buffer_len == 0:
        return torch.zeros_like(lengths)
    start = max_len - buffer_len
    excess = (lengths - start).clamp(min=0.0, max=float(buffer_len))
    return -penalty * excess / buffer_len


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``(N / G,)`` bool: the groups whose rewards are *not* all equal (DAPO's dynamic sampling).

    A group with identical rewards gets zero group-relative advantage for every completion, so
    it contributes no policy gradient (only KL/entropy terms) while counting in the loss normaliser.

    Args:
        rewards: ``(N,)`` group-contiguous rewards.
        group_size: G; ``N`` must be a multiple of it.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"need 1-D rewards whose length is a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.reshape(-1, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)
