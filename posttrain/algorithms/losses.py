"""Policy losses, KL estimators, entropy and loss aggregation: pure tensor functions.

Shapes: ``B`` sequences (completions) by ``T`` response tokens; ``mask`` marks the real
(non-padding) response tokens. Per-token quantities are ``(B, T)``; :func:`aggregate_loss`
turns them into the scalar that is back-propagated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from posttrain.algorithms.registry import LOSS_AGGREGATIONS, POLICY_LOSSES, Registry

# exp(20) ~ 4.9e8 is far beyond any clip range yet finite in float32 (and bf16): a diverged
# token (e.g. logprob -1e4 after a bad update) then cannot produce inf, and inf * 0 = NaN.
LOG_RATIO_CLAMP = 20.0

KL_ESTIMATORS = Registry("KL estimator")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # An empty mask gives 0 rather than 0/0 = NaN in the logs.
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensor shapes differ: {shapes}")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip_c: float = 0.0,
    **_unused,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective, per token (Schulman et al. 2017, arXiv:1707.06347).

    ``loss_t = -min(ratio_t * A, clip(ratio_t, 1 - low, 1 + high) * A)`` with
    ``ratio_t = exp(logprobs_t - old_logprobs_t)``. GRPO (arXiv:2402.03300) uses it with
    group-relative advantages; DAPO's clip-higher (arXiv:2503.14476) sets ``high > low``
    (e.g. 0.28 / 0.2) so that unlikely tokens can gain probability faster.

    Where the clipped term is the minimum, the loss is constant in ``logprobs`` and the token
    contributes no gradient: the update may not push the ratio further outside the trust region.

    Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", arXiv:1912.09729): with a negative advantage the clipped objective above is
    unbounded as the ratio grows (``-ratio * A``), so one token that became far more likely
    than at sampling time can dominate the update. With ``dual_clip_c = c > 1`` the loss of
    tokens with ``A < 0`` is capped at ``-c * A`` (the value at ratio ``c``); beyond it the token
    contributes no gradient. ``0`` turns it off.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the current policy
            (differentiable).
        old_logprobs: ``(B, T)`` the same under the policy that generated them (no gradient).
        advantages: ``(B,)`` one per sequence (broadcast over tokens) or ``(B, T)`` per token.
        mask: ``(B, T)`` bool or 0/1, valid response tokens.
        clip_ratio_low: the ratio is clipped below at ``1 - clip_ratio_low``.
        clip_ratio_high: the ratio is clipped above at ``1 + clip_ratio_high``.
        dual_clip_c: dual-clip constant ``c > 1`` for negative advantages; 0 is off.
        **_unused: options of other policy losses (every loss is called with the same keywords).

    Returns:
        ``(loss, metrics)``: ``loss`` is ``(B, T)`` float32, 0 on masked positions (aggregate it
        with :func:`aggregate_loss`); ``metrics`` holds detached scalar tensors, masked means
        over valid tokens: ``clip_fraction`` (share of tokens where clipping changed the
        objective), ``ratio_mean``, ``ratio_max`` and ``approx_kl`` (k3 estimate of
        KL(old || new); the tokens were sampled from the old policy); with dual-clip on also
        ``dual_clip_fraction`` (share of tokens at the ``-c * A`` cap). With no valid token
        every metric is 0.

    The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (see ``LOG_RATIO_CLAMP``); this
    only matters for tokens far outside the clip range, whose gradient is zero anyway.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages {tuple(advantages.shape)} do not match batch size {logprobs.shape[0]}")
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(advantages.shape)}")

    valid = mask.bool()
    # float32 because exp() of a bf16 log-ratio is off by up to ~0.4%, the size of a clip step.
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().float()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip_c > 0:
        if dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1 (or 0 to turn dual-clip off), got {dual_clip_c}")
        capped = torch.minimum(loss, -dual_clip_c * advantages)
        dual_clipped = (advantages < 0) & (capped < loss)
        loss = torch.where(advantages < 0, capped, loss)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    with torch.no_grad():
        ratio_d = ratio.detach()
        metrics = {
            "clip_fraction": _masked_mean((clipped < unclipped).float(), valid),
            "ratio_mean": _masked_mean(ratio_d, valid),
            # ratio > 0, so 0 marks "no valid token" unambiguously.
            "ratio_max": torch.where(valid, ratio_d, torch.zeros_like(ratio_d)).max(),
            "approx_kl": _masked_mean(kl_penalty(old_logprobs.float(), logprobs.detach().float(), "k3"), valid),
        }
        if dual_clip_c > 0:
            metrics["dual_clip_fraction"] = _masked_mean(dual_clipped.float(), valid)
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    gspo_clip_low: float = 3e-4,
    gspo_clip_high: float = 4e-4,
    **_unused,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv:2507.18071), in its per-token form.

    The importance ratio is one number per *sequence*, the length-normalised likelihood ratio
    ``s_i = exp(mean_{t valid} (logprobs_it - old_logprobs_it))``, and it is clipped per sequence
    to ``[1 - gspo_clip_low, 1 + gspo_clip_high]``; the clip range is small (paper: 3e-4 / 4e-4)
    because ``s_i`` is a geometric mean over tokens. Each token's loss is
    ``-min(s_it * A_it, clip(s_it) * A_it)`` with
    ``s_it = sg[s_i] * exp(logprobs_it - sg[logprobs_it])``: its value is ``s_i`` and its gradient
    ``s_i * grad logprobs_it``. Averaged per sequence (``seq-mean-token-mean``) and with one
    advantage per sequence, the gradient is exactly the paper's
    ``s_i * A_i * (1/|y_i|) * sum_t grad logprobs_it`` (GSPO-token, section 4.3); a clipped
    sequence contributes no gradient at all.

    Args:
        logprobs, old_logprobs, mask: as :func:`ppo_clip_loss`.
        advantages: ``(B,)`` or ``(B, T)``.
        gspo_clip_low, gspo_clip_high: the sequence ratio is clipped to
            ``[1 - gspo_clip_low, 1 + gspo_clip_high]``.
        **_unused: options of other policy losses.

    Returns:
        ``(loss, metrics)`` as :func:`ppo_clip_loss`; ``clip_fraction`` is the share of valid tokens
        in sequences whose clipped term is active, ``ratio_mean``/``ratio_max`` are over the
        sequence ratios (token-weighted), ``approx_kl`` is the per-token k3 estimate.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages {tuple(advantages.shape)} do not match batch size {logprobs.shape[0]}")
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(advantages.shape)}")

    valid = mask.bool()
    logprobs_f = logprobs.float()
    token_log_ratio = torch.where(valid, logprobs_f - old_logprobs.float(), torch.zeros_like(logprobs_f))
    seq_log_ratio = token_log_ratio.sum(dim=-1, keepdim=True) / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    # Value s_i on every token, gradient s_i * d logprobs_it (stop-gradient construction).
    log_ratio = (seq_log_ratio.detach() + logprobs_f - logprobs_f.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().float()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - gspo_clip_low, 1.0 + gspo_clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    with torch.no_grad():
        ratio_d = ratio.detach()
        metrics = {
            "clip_fraction": _masked_mean((clipped < unclipped).float(), valid),
            "ratio_mean": _masked_mean(ratio_d, valid),
            "ratio_max": torch.where(valid, ratio_d, torch.zeros_like(ratio_d)).max(),
            "approx_kl": _masked_mean(kl_penalty(old_logprobs.float(), logprobs.detach().float(), "k3"), valid),
        }
    return loss, metrics


@KL_ESTIMATORS.register("k1")
def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


@KL_ESTIMATORS.register("k2")
def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


@KL_ESTIMATORS.register("k3")
def _kl_k3(log_ratio: Tensor) -> Tensor:
    # In terms of r = ref/policy: (r - 1) - log r, which is >= 0 for every r since log r <= r - 1.
    # The clamp keeps exp() finite when the policy drifts far from the reference.
    neg = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(neg) - neg - 1.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy.

    Estimators (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html),
    with ``d = logprobs - ref_logprobs``:

    - ``k1 = d``: unbiased, high variance, can be negative per token.
    - ``k2 = d**2 / 2``: biased, low variance, >= 0.
    - ``k3 = exp(-d) + d - 1``: unbiased, low variance, >= 0 (used by DeepSeekMath GRPO).

    For k3 the log-ratio is clamped to ``[-20, 20]`` before ``exp`` so a diverged token gives a
    large finite penalty instead of inf.

    Args:
        logprobs: ``(B, T)`` (any shape) log-probabilities under the policy.
        ref_logprobs: same shape, under the reference model.
        estimator: "k1", "k2" or "k3".

    Returns:
        Tensor of the inputs' shape (unmasked; aggregate with the response mask).

    Raises:
        ConfigError: unknown estimator (the message lists k1, k2, k3).
    """
    fn = KL_ESTIMATORS.get(estimator)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return fn(logprobs - ref_logprobs)


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` over the last dim.

    ``H = logsumexp(l) - sum(softmax(l) * l)`` on max-centred logits, which never takes the
    log of an underflowed probability. Rows are processed ``chunk_size`` at a time in float32, so a bf16
    ``(B, T, V)`` tensor with a 150k vocabulary is never copied to float32 in full.
    Logits must be finite (a -inf logit gives 0 * -inf = NaN).

    Args:
        logits: ``(..., V)``.
        chunk_size: rows (flattened leading positions) per chunk.

    Returns:
        ``(...)`` float32 entropies in nats, differentiable.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].float()
        # H is shift-invariant; centring on the max avoids cancellation in lse - E[l] when
        # logits are large (1000 + log V - 1000 loses ~1e-4 in float32). Detached: exact grads.
        chunk = chunk - chunk.detach().amax(dim=-1, keepdim=True)
        lse = torch.logsumexp(chunk, dim=-1)
        probs = torch.softmax(chunk, dim=-1)
        parts.append(lse - (probs * chunk).sum(dim=-1))
    if not parts:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(parts).reshape(logits.shape[:-1])


@LOSS_AGGREGATIONS.register("token-mean")
def _agg_token_mean(masked: Tensor, valid: Tensor, num_tokens, num_sequences, norm_length) -> Tensor:
    denom = valid.sum().clamp(min=1) if num_tokens is None else num_tokens
    return masked.sum() / denom


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _agg_seq_mean_token_mean(masked: Tensor, valid: Tensor, num_tokens, num_sequences, norm_length) -> Tensor:
    per_seq = masked.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
    return per_seq.sum() / (masked.shape[0] if num_sequences is None else num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(masked: Tensor, valid: Tensor, num_tokens, num_sequences, norm_length) -> Tensor:
    seqs = masked.shape[0] if num_sequences is None else num_sequences
    length = masked.shape[-1] if norm_length is None else norm_length
    return masked.sum() / (seqs * length)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to the scalar that is back-propagated.

    Modes:

    - ``"token-mean"``: ``sum(loss * mask) / num_tokens``; every token of the mini-batch weighs
      the same, so long answers are not down-weighted (DAPO, arXiv:2503.14476).
    - ``"seq-mean-token-mean"``: ``sum_i mean_t(loss_i) / num_sequences``; every sequence weighs
      the same (original GRPO, arXiv:2402.03300). A sequence without valid tokens counts 0.
    - ``"seq-mean-token-sum-norm"``: ``sum(loss * mask) / (num_sequences * norm_length)``; a
      constant normaliser, removing GRPO's length bias (Dr.GRPO, arXiv:2503.20783).

    Gradient accumulation: the normalisers default to the statistics of *this* batch
    (``mask.sum()``, ``B``, ``T``). When a mini-batch is split into micro-batches, pass the
    *mini-batch's* values (total valid tokens, total sequences, the max response length budget)
    to every micro-batch call. Each mode is then a sum of per-token or per-sequence terms over
    one shared constant, so the micro-batch results (and their gradients) add up exactly to the
    full mini-batch value, however unevenly the micro-batches are sized or padded. With the
    defaults, a micro-batch of 2 long answers and one of 30 short ones would weigh their tokens
    differently, and a per-micro-batch ``T`` would vary with padding.

    Args:
        per_token_loss: ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1, valid tokens. Masked positions are ignored even if
            they hold inf/NaN.
        mode: a name registered in ``LOSS_AGGREGATIONS``.
        num_tokens: global valid-token count ("token-mean").
        num_sequences: global sequence count ("seq-mean-*").
        norm_length: length normaliser ("seq-mean-token-sum-norm"), e.g. rollout.max_new_tokens.

    Returns:
        Scalar tensor.

    Raises:
        ConfigError: unknown mode (the message lists the registered ones).
        ValueError: shapes differ, or a given normaliser is not positive.
    """
    fn: Callable = LOSS_AGGREGATIONS.get(mode)
    _check_same_shape(per_token_loss=per_token_loss, mask=mask)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be (B, T), got shape {tuple(per_token_loss.shape)}")
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences), ("norm_length", norm_length)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    valid = mask.bool()
    masked = torch.where(valid, per_token_loss, torch.zeros_like(per_token_loss))
    return fn(masked, valid, num_tokens, num_sequences, norm_length)
