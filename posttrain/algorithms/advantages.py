"""Advantage estimators: rewards -> advantages, pure tensor functions.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) replaces PPO's learned value baseline
with the mean reward of a *group* of completions sampled for the same prompt. Dr.GRPO
(Liu et al. 2025, arXiv:2503.20783) argues the additional division by the group's std
over-weights groups that are almost all right or all wrong, and drops it (``scale_by_std=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.registry import ADVANTAGE_ESTIMATORS


@ADVANTAGE_ESTIMATORS.register("grpo")
def compute_grpo_advantages(
    rewards: Tensor,
    *,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages (outcome supervision, one scalar per completion).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` or, with ``scale_by_std=False``,
    ``A_i = r_i - mean(r_group)`` (Dr.GRPO).

    The std is the *unbiased* sample std (Bessel's correction, ``torch.std``'s default), as in
    DeepSeekMath's reference implementation and verl. With group size G the biased std would be
    smaller by ``sqrt((G-1)/G)``, i.e. advantages larger by that factor; only the scale differs.

    Args:
        rewards: ``(N,)`` one reward per completion, *group-contiguous*: rows ``[0:G]`` are the
            G completions of the first prompt, ``[G:2G]`` of the second, and so on.
        group_size: G, completions per prompt.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).
        eps: added to the std so that near-constant groups do not blow up.

    Returns:
        ``(N,)`` advantages, float32 or wider (the dtype of ``rewards`` promoted with float32).
        Groups whose rewards are all equal, and groups of size 1, get exactly 0: they carry no
        learning signal, and a std of 0 (or the NaN std of a single sample) must not produce
        NaN or rounding noise amplified by ``1 / eps``.

    Raises:
        ValueError: ``rewards`` is not 1-D, ``group_size < 1`` or ``N`` is not a multiple of it.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"{n} rewards do not split into groups of {group_size}: the number of completions must be "
            f"a multiple of the group size (rollout.batch_size divisible by rollout.group_size)"
        )
    # Integer/bool rewards and bf16 rewards would lose the fractional part / precision.
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = rewards.detach().to(dtype).reshape(-1, group_size)
    if group_size == 1:
        return torch.zeros(n, dtype=dtype, device=rewards.device)

    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    # mean() of e.g. [0.1]*G need not equal 0.1 bit-for-bit; the ~1e-9 remainder divided by
    # (0 + eps) would become a spurious ~1e-3 advantage, so constant groups are zeroed exactly.
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).reshape(n)


def normalize_advantages(adv: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Whiten advantages to zero mean and unit std over the valid entries.

    Used by estimators whose advantages have no natural scale (e.g. GAE or REINFORCE++ style
    batch normalisation); GRPO already normalises per group.

    Args:
        adv: advantages of any shape, e.g. ``(batch, response_len)``.
        mask: same shape as ``adv`` (bool or 0/1); only entries where it is set enter the
            statistics. ``None``: all entries are valid.
        eps: added to the std.

    Returns:
        Tensor of ``adv``'s shape: ``(adv - mean) / (std + eps)`` on valid entries, 0 elsewhere.
        The std is unbiased (Bessel's correction); with fewer than two valid entries there is
        no spread to normalise by and the result is all zeros.
    """
    if mask is None:
        valid = torch.ones_like(adv, dtype=torch.bool)
    else:
        if mask.shape != adv.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from advantages {tuple(adv.shape)}")
        valid = mask.bool()
    count = valid.sum()
    if count < 2:
        return torch.zeros_like(adv)
    # torch.where, not multiplication, so inf/NaN in padding cannot leak into the statistics.
    values = torch.where(valid, adv, torch.zeros_like(adv))
    mean = values.sum() / count
    centred = torch.where(valid, adv - mean, torch.zeros_like(adv))
    std = (centred.square().sum() / (count - 1)).sqrt()
    return centred / (std + eps)
