"""Preference losses (DPO and relatives): pure tensor functions over per-sequence logprobs.

Every input is ``(B,)``: one value per preference pair, the log-probability of the chosen or
rejected response given the prompt under the policy or the frozen reference model. All losses
are functions of the difference of log-ratios

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

and are registered by the name ``algorithm.loss_type`` uses. Which reduction turns per-token
logprobs into those per-sequence values depends on the loss (see :func:`sequence_logps` and
:data:`LENGTH_AVERAGED_LOSSES`): DPO sums them (the sequence's log-likelihood), IPO averages
them over the response length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algorithms.registry import Registry

PREFERENCE_LOSSES = Registry("preference loss")

# IPO's paper defines its regression target on length-normalised log-likelihoods; without the
# averaging, h grows with response length and the fixed target 1/(2 beta) means different
# things for short and long pairs.
LENGTH_AVERAGED_LOSSES = frozenset({"ipo"})


def uses_length_average(loss_type: str) -> bool:
    """True when ``loss_type`` expects length-averaged (not summed) sequence logprobs."""
    PREFERENCE_LOSSES.get(loss_type)  # unknown names raise ConfigError with suggestions
    return loss_type in LENGTH_AVERAGED_LOSSES


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool) -> Tensor:
    """Per-sequence logprobs ``(B,)`` from per-token ones ``(B, T)`` and a 0/1 ``mask`` ``(B, T)``:
    the sum over real tokens, or their mean when ``average`` (padding may hold any value)."""
    mask = mask.to(token_logps.dtype)
    summed = torch.where(mask > 0, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    if average:
        return summed / mask.sum(dim=-1).clamp(min=1)
    return summed


@PREFERENCE_LOSSES.register("sigmoid")
def sigmoid_preference_loss(h: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-log sigmoid(beta * h)`` per pair.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO, Mitchell 2023): the label
    is assumed flipped with probability eps, so the loss is
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, whose minimum is at a finite
    margin instead of pushing ``h`` to infinity.
    """
    logits = beta * h
    # logsigmoid is the numerically stable form: log(sigmoid(-50)) would be log(0) = -inf.
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@PREFERENCE_LOSSES.register("ipo")
def ipo_preference_loss(h: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036): ``(h - 1/(2 beta))^2`` per pair.

    A squared loss towards a fixed margin, so it cannot overfit deterministic preferences the way
    the sigmoid loss does. ``h`` should be built from length-averaged logprobs. Here ``beta`` is
    the paper's regularisation strength tau: larger beta, smaller target margin.
    ``label_smoothing`` is not defined for IPO and must be 0.
    """
    if label_smoothing:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only; IPO has no label noise term")
    return (h - 1.0 / (2.0 * beta)) ** 2


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair preference losses ``(B,)`` and per-pair metrics (each ``(B,)``, detached).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` sequence logprobs under the policy
            (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the reference (no gradient).
        beta: strength of the implicit KL regularisation to the reference (> 0).
        loss_type: a registered preference loss, "sigmoid" (DPO) or "ipo".
        label_smoothing: cDPO's assumed label-noise rate, in [0, 0.5) ("sigmoid" only).

    Metrics: ``rewards/chosen`` and ``rewards/rejected`` are the implicit rewards
    ``beta * (policy - ref)``; ``rewards/margins`` is their difference; ``rewards/accuracy`` is
    1.0 where the chosen reward is strictly higher. Per pair, so a caller can average them over
    any number of micro-batches exactly.
    """
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected four (B,) tensors of one shape, got shapes {sorted(shapes)}")
    loss_fn = PREFERENCE_LOSSES.get(loss_type)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = loss_fn(chosen_logratios - rejected_logratios, beta=beta, label_smoothing=label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
    }
    return losses, metrics


def get_preference_loss(name: str):
    """The preference loss registered as ``name``; ConfigError if unknown."""
    return PREFERENCE_LOSSES.get(name)
