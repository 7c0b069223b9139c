"""Critic-side pieces of PPO: RLHF reward shaping, GAE, the clipped value loss, explained variance.

Pure tensor functions like the rest of :mod:`posttrain.algorithms`. Shapes are ``(B, T)``: B
responses, T response tokens, right-padded; ``mask`` marks the valid (trained) tokens.

- :func:`rlhf_token_rewards`: the sequence reward on the last valid token minus
  ``kl_coef * KL`` on every token (Ouyang et al. 2022, arXiv:2203.02155; Ziegler et al. 2019).
- :func:`compute_gae`: generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).
- :func:`value_loss`: PPO's clipped squared-error value loss (Schulman et al. 2017,
  arXiv:1707.06347, as in OpenAI baselines' ``ppo2``).
- ``gae`` is registered as an advantage estimator (``algorithm.advantage=gae``, the default of
  ``posttrain ppo``). It needs the critic's values, so only the PPO recipe can call it; it folds
  the KL into the reward, so ``policy_update`` does not add a KL loss term as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.registry import ADVANTAGE_ESTIMATORS


def _check(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensor shapes differ: {shapes}")
    if any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"expected (B, T) tensors, got {shapes}")


def rlhf_token_rewards(
    rewards: Tensor, mask: Tensor, token_kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Per-token rewards ``(B, T)`` of the classic RLHF PPO shaping.

    The sequence reward ``rewards`` ``(B,)`` sits on each row's last valid token; with
    ``kl_coef > 0`` every valid token also gets ``-kl_coef * token_kl`` (the per-token KL to the
    reference model of the sampled tokens, ``(B, T)``). Rows without a valid token are all 0."""
    valid = mask.bool()
    if rewards.dim() != 1 or valid.dim() != 2 or rewards.shape[0] != valid.shape[0]:
        raise ValueError(f"rewards must be (B,) and mask (B, T); got {tuple(rewards.shape)} and {tuple(valid.shape)}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    out = torch.zeros(valid.shape, dtype=dtype, device=rewards.device)
    lengths = valid.sum(dim=1)
    has_tokens = lengths > 0
    # Last valid token: the highest index whose mask is set (masks are right-padded prefixes).
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, index, torch.full_like(index, -1)).amax(dim=1)
    rows = has_tokens.nonzero().flatten()
    out[rows, last[rows]] = rewards.detach().to(dtype)[rows]
    if token_kl is not None and kl_coef > 0:
        _check(token_kl=token_kl, mask=mask)
        out = out - kl_coef * torch.where(valid, token_kl.detach().to(dtype), torch.zeros_like(out))
    return out


def compute_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed backwards over the tokens. The value after the last valid token is 0 (the episode
    ends with the response), so bootstrapping happens only inside the sequence.

    Args:
        token_rewards: ``(B, T)`` reward of each token (see :func:`rlhf_token_rewards`).
        values: ``(B, T)`` the critic's value of the state before each token (no gradient).
        mask: ``(B, T)`` bool or 0/1, valid tokens.
        gamma: discount; 1.0 for LLM responses (the reward comes at the end).
        lam: GAE's bias/variance trade-off; 1.0 is the Monte-Carlo return minus the value,
            0.0 the one-step TD error.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` float32 (or wider), 0 where the mask is not
        set; ``returns = advantages + values`` are the critic's regression targets.
    """
    _check(token_rewards=token_rewards, values=values, mask=mask)
    valid = mask.bool()
    dtype = torch.promote_types(torch.promote_types(token_rewards.dtype, values.dtype), torch.float32)
    zeros = torch.zeros(valid.shape, dtype=dtype, device=values.device)
    rewards = torch.where(valid, token_rewards.detach().to(dtype), zeros)
    values = torch.where(valid, values.detach().to(dtype), zeros)
    advantages = torch.zeros_like(zeros)
    next_value = torch.zeros_like(zeros[:, 0])
    next_advantage = torch.zeros_like(zeros[:, 0])
    for t in reversed(range(valid.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Past the end of a row (padding) nothing is carried back into its valid tokens.
        step_valid = valid[:, t]
        advantages[:, t] = torch.where(step_valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(step_valid, values[:, t], torch.zeros_like(next_value))
        next_advantage = advantages[:, t]
    returns = torch.where(valid, advantages + values, zeros)
    return advantages, returns


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, per token.

    ``loss_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)``: the new
    value may not gain by moving more than ``c = clip_range`` from the value at sampling time
    (Schulman et al. 2017; OpenAI baselines ``ppo2``). ``clip_range = 0`` turns clipping off
    (plain ``0.5 * (V_t - R_t)^2``).

    Args:
        values: ``(B, T)`` the critic's current values (differentiable).
        old_values: ``(B, T)`` the values when the returns were computed (no gradient).
        returns: ``(B, T)`` regression targets (no gradient).
        mask: ``(B, T)`` bool or 0/1, valid tokens.
        clip_range: ``c >= 0``; 0 is off.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``(B, T)`` float32, 0 on masked positions (aggregate it
        with :func:`~posttrain.algorithms.aggregate_loss`); ``metrics`` holds detached scalar
        tensors, masked means: ``clip_fraction`` (share of tokens where the clipped error is the
        larger one), ``values_mean``, ``error_mean`` (mean squared error ``(V - R)^2``).
    """
    _check(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0 (0: off), got {clip_range}")
    valid = mask.bool()
    values = values.float()
    old_values = old_values.detach().float()
    returns = returns.detach().float()
    unclipped = (values - returns).square()
    if clip_range > 0:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
    else:
        clipped = unclipped
        per_token = 0.5 * unclipped
    loss = torch.where(valid, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        count = valid.sum().clamp(min=1)

        def mean(x: Tensor) -> Tensor:
            return torch.where(valid, x.detach(), torch.zeros_like(x)).sum() / count

        metrics = {
            "clip_fraction": mean((clipped > unclipped).float()),
            "values_mean": mean(values),
            "error_mean": mean(unclipped),
        }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens: 1 is a perfect critic, 0 one
    no better than a constant, negative worse than that. NaN when the returns do not vary."""
    _check(values=values, returns=returns, mask=mask)
    valid = mask.bool()
    if valid.sum() < 2:
        return float("nan")
    r, v = returns.detach().double()[valid], values.detach().double()[valid]
    var = r.var()
    if var == 0:
        return float("nan")
    return float(1.0 - (r - v).var() / var)


@ADVANTAGE_ESTIMATORS.register("gae", folds_kl_into_reward=True, needs_critic=True)
def compute_gae_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    *,
    group_size: int = 1,
    values: Tensor | None = None,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_unused,
) -> Tensor:
    """The registry's form of GAE: ``(N,)`` rewards and the critic's ``values`` ``(N, T)`` ->
    ``(N, T)`` advantages (RLHF shaping, then :func:`compute_gae`). ``group_size`` is unused: GAE
    needs no groups. Raises ValueError without ``values`` (only ``posttrain ppo`` has a critic)."""
    if values is None:
        raise ValueError("the 'gae' advantage estimator needs the critic's values: train with `posttrain ppo`")
    token_rewards = rlhf_token_rewards(rewards, response_mask, token_kl, kl_coef)
    advantages, _ = compute_gae(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    return advantages
