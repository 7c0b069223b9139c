"""Off-policy corrections: per-token loss multipliers for samples drawn by another policy.

In asynchronous RL (and whenever the rollout engine's numerics differ from the trainer's) the tokens
were sampled by a *behaviour* policy ``pi_b`` (the engine's weights and kernels) while the update's
ratio is taken against the trainer's *proximal* policy ``pi_old`` (the trainer's recomputed
logprobs; decoupled PPO as in AReaL). The ratio ``pi_old / pi_b`` of each sampled token measures how
far off-policy it is. Each correction here turns it into a detached ``(N, T)`` float32 multiplier of
the per-token policy loss, 0 on padding, registered by the name ``algorithm.off_policy_correction``
uses. Every correction takes the same keywords (``cap``, ``low``, ``high``) and ignores the ones it
does not use, so the trainer calls them all alike.

``off_policy_metrics`` summarises the mismatch and what the correction did with it.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from posttrain.algorithms.losses import LOG_RATIO_CLAMP, _check_same_shape, kl_penalty
from posttrain.algorithms.registry import OFF_POLICY_CORRECTIONS


def _log_ratios(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(valid, log(pi_old / pi_b))`` in float32, detached, clamped (an inf logprob stays finite),
    and 0 on padding so that sums over a sequence see only its valid tokens."""
    _check_same_shape(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    valid = mask.bool()
    log_ratio = (old_logprobs.detach().float() - behaviour_logprobs.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return valid, torch.where(valid, log_ratio, torch.zeros_like(log_ratio))


def _check_cap(cap: float) -> None:
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")


def _check_range(low: float, high: float) -> None:
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")


def _on_valid(weights: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, weights, torch.zeros_like(weights))


@OFF_POLICY_CORRECTIONS.register("none")
def no_correction(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                  cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """No correction: weight 1 on every valid token (the samples are treated as on-policy)."""
    _check_same_shape(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    return mask.detach().bool().float()


@OFF_POLICY_CORRECTIONS.register("tis_token")
def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                         cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """Token-level truncated importance sampling (TIS): ``w_t = min(pi_old(y_t) / pi_b(y_t), cap)``.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (https://fengyao.notion.site/off-policy-rl): the engine that samples (vLLM, SGLang, or an older
    copy of the weights) is not the policy the trainer differentiates, so the policy gradient is
    reweighted per token by the importance ratio; truncating it at ``cap`` trades a little bias for
    bounded variance. ``algorithm.is_correction_cap > 0`` selects this correction with that cap.

    Args:
        old_logprobs: ``(N, T)`` log-probabilities of the sampled tokens under the trainer's copy of
            the sampling policy (the proximal policy).
        behaviour_logprobs: ``(N, T)`` the same reported by the engine that sampled them.
        mask: ``(N, T)`` valid tokens.
        cap: the truncation ``C > 0`` (2 is common).
        low, high: unused.

    Returns:
        ``(N, T)`` float32 weights, detached, in ``(0, cap]`` on valid tokens and 0 on padding.
    """
    _check_cap(cap)
    valid, log_ratio = _log_ratios(old_logprobs, behaviour_logprobs, mask)
    return _on_valid(torch.exp(log_ratio).clamp(max=cap), valid)


@OFF_POLICY_CORRECTIONS.register("tis_seq")
def sequence_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                        cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """Sequence-level truncated importance sampling: one weight per sequence,
    ``min(prod_t pi_old(y_t) / pi_b(y_t), cap)``, on each of its valid tokens.

    The importance weight of a whole completion is the product of its token ratios; it is unbiased
    for sequence-level rewards where the token-level weight is not, at the price of a variance that
    grows with length (hence the cap). This is the sequence-level option of verl's rollout
    correction ("MIS", mismatch importance sampling, in its docs). The summed log-ratio is clamped
    before ``exp``.

    Args: as :func:`truncated_is_weights`.

    Returns:
        ``(N, T)`` float32, detached: the sequence's weight in ``(0, cap]`` on its valid tokens, 0 on
        padding (a sequence with no valid token gets 0 everywhere).
    """
    _check_cap(cap)
    valid, log_ratio = _log_ratios(old_logprobs, behaviour_logprobs, mask)
    seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _on_valid(torch.exp(seq_log_ratio).clamp(max=cap).expand_as(log_ratio), valid)


@OFF_POLICY_CORRECTIONS.register("geo_mask")
def geometric_sequence_mask(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                            cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """Sequence rejection by the geometric-mean ratio: 1 on every valid token of a sequence whose
    ``exp(mean_t log(pi_old(y_t) / pi_b(y_t)))`` lies in ``[low, high]``, else 0.

    The per-token geometric mean does not grow with length as the product does, so one threshold
    suits short and long completions; a sequence the engine sampled very differently from the
    trainer is dropped from the loss instead of being reweighted (the geometric-mean rejection of
    verl's rollout-correction docs, "MIS" with a geometric mask).

    Args: as :func:`truncated_is_weights`, with ``0 < low < high`` the kept range (``cap`` unused).

    Returns:
        ``(N, T)`` float32 of 0/1, detached, 0 on padding.
    """
    _check_range(low, high)
    valid, log_ratio = _log_ratios(old_logprobs, behaviour_logprobs, mask)
    mean_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(mean_log_ratio)
    kept = ((ratio >= low) & (ratio <= high)).float().expand_as(log_ratio)
    return _on_valid(kept, valid)


@OFF_POLICY_CORRECTIONS.register("icepop")
def icepop_mask(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """IcePop: 1 on the valid tokens whose ratio ``pi_old(y_t) / pi_b(y_t)`` lies in ``[low, high]``,
    else 0.

    From the Ling team's Ring-1T report (2025): training and inference engines disagree most on a
    few tokens, and for a mixture-of-experts model those disagreements compound over training. Rather
    than reweighting such tokens, their gradient is dropped altogether, and the rest of the sequence
    still trains.

    Args: as :func:`truncated_is_weights`, with ``0 < low < high`` the kept range (``cap`` unused).

    Returns:
        ``(N, T)`` float32 of 0/1, detached, 0 on padding.
    """
    _check_range(low, high)
    valid, log_ratio = _log_ratios(old_logprobs, behaviour_logprobs, mask)
    ratio = torch.exp(log_ratio)
    return _on_valid(((ratio >= low) & (ratio <= high)).float(), valid)


class OffPolicyCorrection(NamedTuple):
    """The correction a config asks for, with its keywords, after the legacy key is folded in."""

    name: str
    cap: float
    low: float
    high: float

    def weights(self, old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
        """``(N, T)`` loss multipliers of the registered correction ``name``."""
        fn = OFF_POLICY_CORRECTIONS.get(self.name)
        return fn(old_logprobs, behaviour_logprobs, mask, cap=self.cap, low=self.low, high=self.high)


def resolved_off_policy_correction(algo: Any) -> OffPolicyCorrection:
    """The correction of an ``algorithm`` config section.

    ``algorithm.is_correction_cap > 0`` (the older key, deprecated: a ``FutureWarning`` names its
    replacement) with ``off_policy_correction`` 'none' or 'tis_token' means 'tis_token' with
    ``is_correction_cap`` as its cap; the loader rejects it beside any other correction. Anything
    but 'none' needs the trainer's recomputed old logprobs.
    """
    name, cap = algo.off_policy_correction, algo.off_policy_cap
    if algo.is_correction_cap > 0 and name in ("none", "tis_token"):
        name, cap = "tis_token", algo.is_correction_cap
        # FutureWarning, not DeprecationWarning: Python shows it to users by default, once per
        # call site, so a run says it once although the trainer resolves the correction every step.
        warnings.warn(
            f"algorithm.is_correction_cap={algo.is_correction_cap:g} is deprecated; it means "
            f"algorithm.off_policy_correction=tis_token algorithm.off_policy_cap={algo.is_correction_cap:g}, "
            "which do the same: set those (and is_correction_cap=0) instead. See docs/off_policy.md.",
            FutureWarning, stacklevel=2,
        )
    return OffPolicyCorrection(name, float(cap), float(algo.off_policy_low), float(algo.off_policy_high))


def masked_sequence_counts(weights: Tensor, mask: Tensor) -> tuple[int, int, int]:
    """``(sequences, partly masked, dropped)`` of ``(N, T)`` rows: the rows with a valid token, those
    where the correction zeroed at least one valid token, and those where it zeroed all of them
    (``geo_mask`` drops whole sequences; ``icepop`` mostly masks a few tokens of a sequence)."""
    _check_same_shape(weights=weights, mask=mask)
    valid = mask.bool()
    zeroed = valid & (weights.detach() == 0)
    has_valid = valid.any(dim=-1)
    num_zeroed, num_valid = zeroed.sum(dim=-1), valid.sum(dim=-1)
    return (int(has_valid.sum()), int((has_valid & (num_zeroed > 0)).sum()),
            int((has_valid & (num_zeroed == num_valid)).sum()))


def off_policy_metrics(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, weights: Tensor) -> dict[str, float]:
    """How off-policy the valid tokens are, and what the correction's ``weights`` did about it.

    - ``off_policy/mismatch_kl``: k3 estimate of KL(pi_b || pi_old) (the tokens were sampled from
      ``pi_b``), mean over valid tokens.
    - ``off_policy/is_ratio_mean``, ``_p05``, ``_p50``, ``_p95``, ``_max``: the token ratios
      ``pi_old / pi_b`` (log-ratio clamped as in the corrections).
    - ``off_policy/masked_fraction``: the share of valid tokens whose weight is 0.
    - ``off_policy/masked_seq_fraction``: the share of sequences (rows with a valid token) with at
      least one such token; ``off_policy/dropped_seq_fraction``: with all their tokens at weight 0.
    - ``off_policy/weight_mean``: the mean weight over valid tokens.

    Args: ``(N, T)`` tensors, a sequence per row (all the same shape); ``weights`` from a correction.

    Returns:
        The metrics as floats; empty when no token is valid (there is nothing to describe).
    """
    _check_same_shape(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask, weights=weights)
    valid, log_ratio = _log_ratios(old_logprobs, behaviour_logprobs, mask)
    if not valid.any():
        return {}
    log_ratio = log_ratio[valid]
    ratio = torch.exp(log_ratio)
    kl = kl_penalty(behaviour_logprobs.detach().float()[valid], old_logprobs.detach().float()[valid], "k3")
    kept = weights.detach().float()[valid]
    # numpy: torch.quantile refuses inputs of more than 2**24 elements, a few steps' worth of tokens.
    p05, p50, p95 = np.quantile(ratio.cpu().numpy(), [0.05, 0.5, 0.95]).tolist()
    sequences, partly_masked, dropped = masked_sequence_counts(weights, mask)
    return {
        "off_policy/mismatch_kl": kl.mean().item(),
        "off_policy/is_ratio_mean": ratio.mean().item(),
        "off_policy/is_ratio_p05": p05,
        "off_policy/is_ratio_p50": p50,
        "off_policy/is_ratio_p95": p95,
        "off_policy/is_ratio_max": ratio.max().item(),
        "off_policy/masked_fraction": (kept == 0).float().mean().item(),
        "off_policy/masked_seq_fraction": partly_masked / sequences,
        "off_policy/dropped_seq_fraction": dropped / sequences,
        "off_policy/weight_mean": kept.mean().item(),
    }
