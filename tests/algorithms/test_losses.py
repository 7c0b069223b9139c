from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import (
    POLICY_LOSSES,
    aggregate_loss,
    entropy_from_logits,
    gspo_loss,
    kl_penalty,
    ppo_clip_loss,
    truncated_is_weights,
)
from posttrain.errors import ConfigError

RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]


def _logratio(ratios) -> torch.Tensor:
    return torch.tensor(ratios).log()


# ---------------------------------------------------------------- ppo_clip_loss


def test_ppo_clip_positive_and_negative_advantages():
    logprobs = torch.stack([_logratio(RATIOS), _logratio(RATIOS)])
    old = torch.zeros(2, 5)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask)
    # A=+1: -min(r, clip(r, 0.8, 1.2)); only r=1.5 is clipped (to 1.2).
    # A=-1:  max(r, clip(r, 0.8, 1.2)); only r=0.5 is clipped (to 0.8).
    expected = torch.tensor([[-0.5, -0.9, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.1, 1.5]])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 10))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(10.0 / 10))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.5))
    # k3 of KL(old || new) = r - 1 - log r per token.
    k3 = sum(r - 1 - math.log(r) for r in RATIOS) / 5
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(k3))
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


def test_ppo_clip_asymmetric_bounds():
    # clip range [0.8, 1.28] (DAPO clip-higher)
    logprobs = torch.stack([_logratio([1.25, 1.3]), _logratio([0.85, 0.75])])
    loss, metrics = ppo_clip_loss(
        logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2),
        clip_ratio_low=0.2, clip_ratio_high=0.28,
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28], [0.85, 0.8]]))
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(0.5))


def test_ppo_clip_zero_advantage_never_clips():
    loss, metrics = ppo_clip_loss(_logratio([[3.0, 0.1]]), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))
    assert torch.equal(loss, torch.zeros(1, 2))
    assert metrics["clip_fraction"].item() == 0.0


def test_ppo_clip_masked_tokens_are_ignored():
    logprobs = torch.stack([_logratio([1.1, 3.0]), _logratio([0.5, 1.0])])
    mask = torch.tensor([[1, 0], [1, 1]])
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.1, 0.0], [0.8, 1.0]]))
    # Valid tokens: 1.1 (A=+1), 0.5 (A=-1, clipped), 1.0 -> the masked 3.0 is not the max.
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(1 / 3))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(2.6 / 3))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.1))


def test_ppo_clip_per_token_advantages():
    logprobs = _logratio([[1.5, 1.5]])
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, -2.0]]), torch.ones(1, 2))
    torch.testing.assert_close(loss, torch.tensor([[-2.4, 3.0]]))


def test_ppo_clip_gradient_is_zero_for_clipped_tokens():
    logprobs = torch.stack([_logratio(RATIOS), _logratio(RATIOS)]).requires_grad_(True)
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(2, 5), torch.tensor([1.0, -1.0]), torch.ones(2, 5))
    loss.sum().backward()
    # d(-r * A)/d logp = -r * A where unclipped; 0 where the clipped term is active.
    expected = torch.tensor([[-0.5, -0.9, -1.0, -1.1, 0.0], [0.0, 0.9, 1.0, 1.1, 1.5]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_ppo_clip_extreme_log_ratio_stays_finite():
    logprobs = torch.tensor([[0.0, -1e4]], requires_grad=True)
    old = torch.tensor([[-1e4, 0.0]])
    loss, metrics = ppo_clip_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def test_ppo_clip_shape_errors():
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ---------------------------------------------------------------- kl_penalty


def test_kl_estimators_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0, 0.0]])  # d = logp - ref = [1, 0, -2]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, 0.0, -2.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5, 0.0, 2.0]]))
    # k3 = exp(-d) + d - 1
    k3 = [math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([k3]))


def test_k3_is_nonnegative_and_finite():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(8, 16, generator=g) * 3, torch.randn(8, 16, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    extreme = kl_penalty(torch.tensor([1e4, -1e4]), torch.tensor([-1e4, 1e4]), "k3")
    assert torch.isfinite(extreme).all() and (extreme >= 0).all()


def test_unknown_kl_estimator():
    with pytest.raises(ConfigError) as info:
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    assert "k1, k2, k3" in str(info.value)


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_vocab():
    for value in (0.0, 1000.0):  # a large constant must not overflow
        out = entropy_from_logits(torch.full((2, 3, 7), value))
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, torch.full((2, 3), math.log(7)))


def test_entropy_by_hand_and_near_one_hot():
    # logits [0, log 3] -> p = [1/4, 3/4]
    out = entropy_from_logits(torch.tensor([[0.0, math.log(3)], [100.0, 0.0]]))
    expected_first = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(out[0], torch.tensor(expected_first))
    assert 0.0 <= out[1].item() < 1e-6


def test_entropy_chunking_bf16_and_grad():
    logits = torch.randn(5, 3, 11, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    full = entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), full)
    out = entropy_from_logits(logits.detach().bfloat16())
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    full.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- aggregate_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, float("nan"), 0.0], [7.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # third sequence: no valid token


def test_token_mean_by_hand():
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "token-mean"), torch.tensor(21 / 6))
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "token-mean", num_tokens=7), torch.tensor(3.0))


def test_seq_mean_token_mean_by_hand():
    # per-sequence means 2.5, 5.5 and 0 (empty) over 3 sequences
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), torch.tensor(8 / 3))
    torch.testing.assert_close(
        aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_sequences=4), torch.tensor(2.0)
    )


def test_seq_mean_token_sum_norm_by_hand():
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm"), torch.tensor(21 / 12))
    torch.testing.assert_close(
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", num_sequences=5, norm_length=10),
        torch.tensor(21 / 50),
    )


def test_aggregate_errors():
    with pytest.raises(ConfigError, match="Did you mean 'token-mean'"):
        aggregate_loss(LOSS, MASK, "token_mean")
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "token-mean", num_tokens=0)
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    batch, length = 7, 6
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    loss = torch.randn(batch, length, generator=g).requires_grad_(True)
    global_kwargs = dict(num_tokens=mask.sum().item(), num_sequences=batch, norm_length=length)

    full = aggregate_loss(loss, mask, mode, **global_kwargs)
    (full_grad,) = torch.autograd.grad(full, loss)

    total = torch.zeros(())
    for start, end in [(0, 1), (1, 4), (4, 7)]:  # uneven micro-batches
        # Each micro-batch is padded only to its own longest answer, as a collator would.
        width = max(int(lengths[start:end].max()), 1)
        total = total + aggregate_loss(loss[start:end, :width], mask[start:end, :width], mode, **global_kwargs)
    (micro_grad,) = torch.autograd.grad(total, loss)

    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)


def test_micro_batches_with_local_normalisers_do_not_match():
    # Why the global normalisers exist: local token counts weigh tokens differently.
    loss, mask = torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    full = aggregate_loss(loss, mask, "token-mean")  # 5 / 3
    local = aggregate_loss(loss[:1], mask[:1], "token-mean") + aggregate_loss(loss[1:], mask[1:], "token-mean")
    assert not torch.isclose(full, local)


# ---------------------------------------------------------------- dual-clip PPO


def test_dual_clip_caps_negative_advantage_loss():
    # A = -2, c = 3: loss = min(max(-r A, -clip(r) A), -c A) = min(max(2r, 2 clip(r)), 6).
    logprobs = _logratio([[0.5, 1.0, 2.5, 3.5, 10.0]]).requires_grad_(True)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(1, 5), torch.tensor([-2.0]), torch.ones(1, 5), dual_clip_c=3.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([[1.6, 2.0, 5.0, 6.0, 6.0]]))
    torch.testing.assert_close(metrics["dual_clip_fraction"], torch.tensor(2 / 5))
    loss.sum().backward()
    # d(2r)/dlogp = 2r where the unclipped term is active, 0 where clipped or capped.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 5.0, 0.0, 0.0]]))


def test_dual_clip_leaves_positive_advantages_and_off_is_plain_ppo():
    logprobs = torch.stack([_logratio(RATIOS + [10.0]), _logratio(RATIOS + [10.0])])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 6)
    plain, plain_metrics = ppo_clip_loss(logprobs, torch.zeros(2, 6), adv, mask)
    dual, _ = ppo_clip_loss(logprobs, torch.zeros(2, 6), adv, mask, dual_clip_c=3.0)
    torch.testing.assert_close(dual[0], plain[0])
    torch.testing.assert_close(dual[1], torch.tensor([0.8, 0.9, 1.0, 1.1, 1.5, 3.0]))
    assert "dual_clip_fraction" not in plain_metrics
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_clip_loss(logprobs, torch.zeros(2, 6), adv, mask, dual_clip_c=0.5)


# ---------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_and_clipping_by_hand():
    # Row 0: log ratios [0.001, 0.0003, pad] -> s = exp(0.00065) > 1 + 4e-4: clipped for A = +1.
    # Row 1: log ratios [0.0001, -0.0001, 0.0003] -> s = exp(0.0001): inside [1 - 3e-4, 1 + 4e-4].
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.001, 0.0003, 5.0], [0.0001, -0.0001, 0.0003]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, metrics = gspo_loss(logprobs, old, torch.tensor([1.0, -2.0]), mask)
    s1 = math.exp(0.0001)
    expected = torch.tensor([[-(1 + 4e-4), -(1 + 4e-4), 0.0], [2 * s1, 2 * s1, 2 * s1]])
    torch.testing.assert_close(loss, expected.float())
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 5))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor((2 * math.exp(0.00065) + 3 * s1) / 5))


def _gspo_sequence_objective(logprobs, old, adv, mask, low=3e-4, high=4e-4):
    """The paper's objective written at sequence level, without any stop-gradient trick."""
    m = mask.float()
    s = torch.exp(((logprobs - old) * m).sum(-1) / m.sum(-1))
    return -torch.minimum(s * adv, s.clamp(1 - low, 1 + high) * adv).mean()


def test_gspo_gradient_matches_the_sequence_level_objective():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    # Row 0 stays inside the clip range, row 1 is outside it (A > 0: no gradient), row 2 below (A < 0).
    delta = torch.tensor([[1e-4, -2e-4, 1e-4, 0.0], [5e-3, 5e-3, 5e-3, 5e-3], [-5e-3, -5e-3, -5e-3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, 1.0, -0.7], dtype=torch.float64)

    a = (old + delta).requires_grad_(True)
    loss, _ = gspo_loss(a, old, adv, mask)
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()

    b = (old + delta).requires_grad_(True)
    _gspo_sequence_objective(b, old, adv, mask).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    # Hand-derived: d/dlogp_it = -A_i s_i / (|y_i| B) inside the range, 0 for the clipped rows.
    s0 = math.exp(delta[0].sum().item() / 4)
    torch.testing.assert_close(a.grad[0], torch.full((4,), -1.5 * s0 / (4 * 3), dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert torch.equal(a.grad[1:], torch.zeros(2, 4, dtype=a.grad.dtype))

    # Finite differences on one token of row 0.
    eps = 1e-6
    plus, minus = (old + delta).clone(), (old + delta).clone()
    plus[0, 1] += eps
    minus[0, 1] -= eps
    fd = (_gspo_sequence_objective(plus, old, adv, mask) - _gspo_sequence_objective(minus, old, adv, mask)) / (2 * eps)
    assert a.grad[0, 1].item() == pytest.approx(fd.item(), rel=1e-4)


def test_every_policy_loss_takes_the_common_keywords():
    options = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, dual_clip_c=0.0, gspo_clip_low=3e-4, gspo_clip_high=4e-4)
    for name in POLICY_LOSSES.names():
        loss, metrics = POLICY_LOSSES.get(name)(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), **options)
        assert loss.shape == (2, 3) and {"clip_fraction", "ratio_mean", "approx_kl"} <= set(metrics), name


# ---------------------------------------------------------------- truncated importance sampling


def test_truncated_is_weights_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2)]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.9), math.log(0.4)]])
    mask = torch.tensor([[1, 1, 0]])
    # ratios 2, 1, 0.5 (padding) -> capped at 1.5: [1.5, 1, 0].
    w = truncated_is_weights(old, rollout, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, 0.0]]))
    w = truncated_is_weights(old, rollout, torch.ones(1, 3), cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, rollout, mask, cap=0.0)
