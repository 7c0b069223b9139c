"""GAE, RLHF reward shaping, the clipped value loss and explained variance against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import (
    compute_gae,
    explained_variance,
    folds_kl_into_reward,
    get_advantage_estimator,
    rlhf_token_rewards,
    value_loss,
)

REWARDS = [0.0, 0.0, 1.0]
VALUES = [0.5, 0.6, 0.7]


def gae(rewards, values, mask, gamma, lam):
    return compute_gae(torch.tensor([rewards]), torch.tensor([values]), torch.tensor([mask]), gamma=gamma, lam=lam)


def test_gae_gamma_1_lambda_1_is_return_minus_value():
    adv, ret = gae(REWARDS, VALUES, [1, 1, 1], 1.0, 1.0)
    # A_2 = 1 - 0.7; A_1 = 0 + 0.7 - 0.6 + A_2; A_0 = 0 + 0.6 - 0.5 + A_1
    a2 = 1 - 0.7
    a1 = 0.7 - 0.6 + a2
    a0 = 0.6 - 0.5 + a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))


def test_gae_gamma_and_lambda_by_hand():
    gamma, lam = 0.9, 0.95
    adv, ret = gae(REWARDS, VALUES, [1, 1, 1], gamma, lam)
    d2 = 1.0 + 0.9 * 0.0 - 0.7
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.95 * a2
    a0 = d0 + 0.9 * 0.95 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))


def test_gae_lambda_0_is_td_error():
    adv, _ = gae(REWARDS, VALUES, [1, 1, 1], 1.0, 0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.6 - 0.5, 0.7 - 0.6, 1.0 - 0.7]]))


def test_gae_does_not_bootstrap_past_the_end_and_zeroes_padding():
    # Row 0 has two valid tokens: the value at the padded third position (9.0) must not leak in.
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]]),
                           torch.tensor([[0.5, 0.6, 9.0], [0.5, 0.6, 0.7]]),
                           torch.tensor([[1, 1, 0], [1, 1, 1]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[0], torch.tensor([1.0 - 0.5, 1.0 - 0.6, 0.0]))
    torch.testing.assert_close(ret[0], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(adv[1], torch.tensor([0.5, 0.4, 0.3]))


def test_rlhf_token_rewards_put_reward_on_last_token_minus_kl():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 7.0], [0.0, 0.5, 1.0], [3.0, 3.0, 3.0]])
    out = rlhf_token_rewards(torch.tensor([1.0, 2.0, 4.0]), mask, kl, kl_coef=0.5)
    expected = torch.tensor([[-0.05, 1.0 - 0.1, 0.0], [0.0, -0.25, 2.0 - 0.5], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rlhf_token_rewards(torch.tensor([1.0, 2.0, 4.0]), mask),
                               torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_gae_registered_and_folds_kl():
    estimator = get_advantage_estimator("gae")
    assert folds_kl_into_reward(estimator)
    adv = estimator(torch.tensor([1.0]), torch.tensor([[1, 1, 1]]), group_size=1,
                    values=torch.tensor([VALUES]), gamma=1.0, lam=1.0, scale_by_std=True)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    with pytest.raises(ValueError, match="critic"):
        estimator(torch.tensor([1.0]), torch.tensor([[1]]), group_size=1)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.55, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped value 0.7 -> 0.49: the max is 1
    # token 1: unclipped 0, clipped value 0.3 -> 0.09: the max (clipped) is 0.09
    # token 2: inside the range: both (0.55 - 1)^2 = 0.2025
    expected = torch.tensor([[0.5 * 1.0, 0.5 * 0.09, 0.5 * 0.2025, 0.0]])
    torch.testing.assert_close(loss, expected)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["values_mean"].item() == pytest.approx((1.0 + 0.0 + 0.55) / 3)
    loss.sum().backward()
    # The clipped branch of token 1 is constant in the value: no gradient there.
    torch.testing.assert_close(values.grad, torch.tensor([[1.0, 0.0, 0.55 - 1.0, 0.0]]))


def test_value_loss_clip_off():
    values = torch.tensor([[1.0, 0.0]])
    loss, metrics = value_loss(values, torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]),
                               torch.tensor([[1, 1]]), clip_range=0.0)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.5]]))
    assert metrics["clip_fraction"].item() == 0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))
