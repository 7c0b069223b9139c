"""Advantage estimators: rewards -> per-token advantages, pure tensor functions.

Every estimator has the same signature, so the trainer calls whichever the config names without
special cases::

    fn(rewards, response_mask, *, group_size, **options) -> advantages

- ``rewards``: ``(N,)`` one scalar reward per completion, *group-contiguous*: rows ``[0:G]`` are
  the G completions of the first prompt, ``[G:2G]`` of the second, and so on.
- ``response_mask``: ``(N, T)`` bool or 0/1, the response tokens that are trained on.
- ``group_size``: G.
- ``options``: keyword options; each estimator takes the ones it uses and ignores the rest
  (``scale_by_std``, ``eps``, ``token_kl``, ``kl_coef``).
- returns ``(N, T)`` float32 (or wider) advantages, 0 on positions where the mask is not set.
  Sequence-level estimators broadcast one value over a completion's valid tokens.

Registered estimators:

- ``grpo``: group mean baseline, optionally divided by the group std (Shao et al. 2024,
  DeepSeekMath, arXiv:2402.03300); ``scale_by_std=False`` is Dr.GRPO (Liu et al. 2025,
  arXiv:2503.20783).
- ``rloo``: leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740).
- ``reinforce_plus_plus``: per-token return with an optional per-token KL penalty in the reward,
  whitened over the batch (Hu 2025, REINFORCE++, arXiv:2501.03262).
- ``reinforce_plus_plus_baseline``: the same after subtracting the group mean reward.

Estimators that fold a KL penalty into the reward are registered with
``folds_kl_into_reward=True`` (see :func:`folds_kl_into_reward`): the trainer then hands them the
per-token KL and does not add a KL term to the loss as well.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from posttrain.algorithms.registry import ADVANTAGE_ESTIMATORS


def normalize_advantages(adv: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Whiten advantages to zero mean and unit std over the valid entries.

    The single masked-whitening implementation of the package (REINFORCE++ and its baseline
    variant use it; GRPO already normalises per group).

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


def folds_kl_into_reward(estimator: str | Callable) -> bool:
    """Whether the advantage estimator (its registered name, or the function) adds
    ``-kl_coef * token_kl`` to the reward itself (REINFORCE++, GAE): a property it is registered
    with. The trainer then computes the per-token KL before the advantages and leaves it out of the loss.
    """
    return bool(ADVANTAGE_ESTIMATORS.property(estimator, "folds_kl_into_reward", False))


def _check_inputs(rewards: Tensor, response_mask: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Validated ``(rewards as float (N,), mask as bool (N, T))``."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must be (N, T) with N={rewards.shape[0]} rows, got shape {tuple(response_mask.shape)}"
        )
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
    return rewards.detach().to(dtype), response_mask.bool()


def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, T)``: the sequence's value on its valid tokens, 0 elsewhere."""
    values = per_sequence.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask, values, torch.zeros_like(values))


def _constant_groups(grouped: Tensor) -> Tensor:
    """``(N/G, 1)`` bool: groups whose rewards are all equal (they carry no signal)."""
    return grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)


@ADVANTAGE_ESTIMATORS.register("grpo")
def compute_grpo_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    *,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    **_unused,
) -> Tensor:
    """Group-relative advantages (outcome supervision, one value per completion).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` or, with ``scale_by_std=False``,
    ``A_i = r_i - mean(r_group)`` (Dr.GRPO), broadcast over the completion's valid tokens.

    The std is the *unbiased* sample std (Bessel's correction, ``torch.std``'s default), as in
    DeepSeekMath's reference implementation and verl. With group size G the biased std would be
    smaller by ``sqrt((G-1)/G)``, i.e. advantages larger by that factor; only the scale differs.

    Args:
        rewards: ``(N,)``, group-contiguous (see the module docstring).
        response_mask: ``(N, T)`` valid response tokens.
        group_size: G, completions per prompt.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).
        eps: added to the std so that near-constant groups do not blow up.

    Returns:
        ``(N, T)`` advantages, float32 or wider. Groups whose rewards are all equal, and groups
        of size 1, get exactly 0: they carry no learning signal, and a std of 0 (or the NaN std
        of a single sample) must not produce NaN or rounding noise amplified by ``1 / eps``.

    Raises:
        ValueError: ``rewards`` is not 1-D, the mask is not ``(N, T)``, ``group_size < 1`` or
            ``N`` is not a multiple of it.
    """
    rewards, mask = _check_inputs(rewards, response_mask, group_size)
    if group_size == 1:
        return torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    # mean() of e.g. [0.1]*G need not equal 0.1 bit-for-bit; the ~1e-9 remainder divided by
    # (0 + eps) would become a spurious ~1e-3 advantage, so constant groups are zeroed exactly.
    per_sequence = centred.masked_fill(_constant_groups(grouped), 0.0).reshape(-1)
    return _broadcast(per_sequence, mask)


@ADVANTAGE_ESTIMATORS.register("rloo")
def compute_rloo_advantages(rewards: Tensor, response_mask: Tensor, *, group_size: int, **_unused) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740).

    ``A_i = r_i - mean_{j != i} r_j``: each completion's baseline is the mean reward of the *other*
    G-1 completions of its group, so the baseline does not depend on the completion itself and
    the policy gradient stays unbiased. Equivalently ``A_i = G / (G - 1) * (r_i - mean(r_group))``.
    No std scaling. Broadcast over the valid tokens.

    Args:
        rewards: ``(N,)``, group-contiguous.
        response_mask: ``(N, T)``.
        group_size: G; groups of 1 have no other completion and get 0.

    Returns:
        ``(N, T)`` advantages; exactly 0 for constant groups. E.g. rewards ``[1, 0, 0, 1]`` in one
        group give ``[2/3, -2/3, -2/3, 2/3]``.
    """
    rewards, mask = _check_inputs(rewards, response_mask, group_size)
    if group_size == 1:
        return torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    grouped = rewards.reshape(-1, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    per_sequence = (grouped - others_mean).masked_fill(_constant_groups(grouped), 0.0).reshape(-1)
    return _broadcast(per_sequence, mask)


def _whitened_returns(
    rewards: Tensor, mask: Tensor, token_kl: Tensor | None, kl_coef: float, eps: float
) -> Tensor:
    """REINFORCE++ core: token rewards -> gamma=1 returns -> whitening over the batch's valid tokens."""
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if token_kl is not None and kl_coef != 0:
        if token_kl.shape != mask.shape:
            raise ValueError(f"token_kl shape {tuple(token_kl.shape)} differs from response_mask {tuple(mask.shape)}")
        kl = torch.where(mask, token_kl.detach().to(rewards.dtype), torch.zeros_like(token_rewards))
        token_rewards = token_rewards - kl_coef * kl
    # The sequence reward arrives at the last valid token (rows without one get nothing).
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    token_rewards[rows, last[has_token]] += rewards[has_token]
    # Return G_t = sum_{s >= t} r_s (gamma = 1): a reversed cumulative sum.
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1)
    returns = torch.where(mask, returns, torch.zeros_like(returns))
    return normalize_advantages(returns, mask, eps=eps)


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus", folds_kl_into_reward=True)
def compute_reinforce_pp_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    *,
    group_size: int,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
    **_unused,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models", arXiv:2501.03262).

    Per-token reward ``r_t = -kl_coef * token_kl_t``, plus the sequence reward at the last valid
    token; the return ``G_t = sum_{s >= t} r_s`` (gamma = 1); then the returns are whitened over
    *all valid tokens of the batch* (:func:`normalize_advantages`) instead of using a critic or a
    group baseline. Without KL every token of a completion has the same return (its reward), and
    the whitening is over tokens, so longer completions weigh more in the mean and std.

    Args:
        rewards: ``(N,)`` sequence rewards.
        response_mask: ``(N, T)`` valid response tokens.
        group_size: unused (no grouping); accepted for the common signature.
        token_kl: ``(N, T)`` optional per-token KL(policy || reference) estimate of the sampled
            tokens; padding values are ignored.
        kl_coef: weight of the KL penalty in the reward (``algorithm.kl_coef``).
        eps: added to the std in the whitening.

    Returns:
        ``(N, T)`` advantages, zero mean and unit std over valid tokens, 0 on padding.
    """
    rewards, mask = _check_inputs(rewards, response_mask, group_size)
    return _whitened_returns(rewards, mask, token_kl, kl_coef, eps)


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline", folds_kl_into_reward=True)
def compute_reinforce_pp_baseline_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    *,
    group_size: int,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
    **_unused,
) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): subtract the group mean reward, then
    proceed as :func:`compute_reinforce_pp_advantages` (optional KL in the reward, gamma=1
    return, whitening over the batch's valid tokens).

    The group mean removes the prompt's difficulty (like GRPO) and the global whitening, rather
    than GRPO's per-group std, sets the scale, so near-constant groups are not blown up.

    Args, returns: as :func:`compute_reinforce_pp_advantages`; ``group_size`` is G.
    """
    rewards, mask = _check_inputs(rewards, response_mask, group_size)
    grouped = rewards.reshape(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(_constant_groups(grouped), 0.0)
    return _whitened_returns(centred.reshape(-1), mask, token_kl, kl_coef, eps)
