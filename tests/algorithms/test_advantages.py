from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import (
    ADVANTAGE_ESTIMATORS,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_reinforce_pp_baseline_advantages,
    compute_rloo_advantages,
    folds_kl_into_reward,
    normalize_advantages,
)

EPS = 1e-6


def grpo(rewards, **kwargs):
    """GRPO advantages of sequences of 3 tokens (the last one padding), checked to be broadcast;
    returns the per-sequence values."""
    n = rewards.numel()
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[:, 2] = False
    adv = compute_grpo_advantages(rewards, mask, **kwargs)
    assert adv.shape == (n, 3)
    assert torch.equal(adv[:, 0], adv[:, 1]) and torch.equal(adv[:, 2], torch.zeros(n))
    return adv[:, 0]


def test_grpo_scaled_by_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo(rewards, group_size=4)
    # Group 1: mean 0.5, deviations +-0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    a = 0.5 / (math.sqrt(1 / 3) + EPS)  # ~0.866
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_grpo_uses_bessel_correction():
    # Unbiased std of [0, 1, 2] is 1 (biased would be sqrt(2/3)).
    adv = grpo(torch.tensor([0.0, 1.0, 2.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + EPS))


def test_grpo_without_std_is_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo(rewards, group_size=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_groups_are_contiguous():
    rewards = torch.tensor([2.0, 0.0, 5.0, 3.0])
    adv = grpo(rewards, group_size=2, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_constant_groups_give_exact_zeros(scale_by_std):
    # 0.1 is not exactly representable: the group mean may differ from it by an ulp.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0, 0.0])
    adv = grpo(rewards, group_size=4, scale_by_std=scale_by_std)
    assert torch.equal(adv, torch.zeros(12))


def test_group_of_one_is_zero_not_nan():
    adv = grpo(torch.tensor([1.0, 0.0, 3.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_integer_rewards_are_promoted_to_float():
    adv = grpo(torch.tensor([1, 0]), group_size=2, scale_by_std=False)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of the group size"):
        compute_grpo_advantages(torch.zeros(6), torch.ones(6, 2), group_size=4)
    with pytest.raises(ValueError, match="1-D"):
        compute_grpo_advantages(torch.zeros(2, 4), torch.ones(2, 4), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        compute_grpo_advantages(torch.zeros(4), torch.ones(4, 2), group_size=0)


def test_normalize_advantages_masked():
    adv = torch.tensor([[1.0, 2.0], [3.0, float("inf")]])
    mask = torch.tensor([[True, True], [True, False]])
    # Valid values 1, 2, 3: mean 2, unbiased std 1; the masked inf must not leak in.
    out = normalize_advantages(adv, mask, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_normalize_advantages_unmasked():
    out = normalize_advantages(torch.tensor([2.0, 4.0, 6.0, 8.0]), eps=0.0)
    # mean 5, unbiased std sqrt((9 + 1 + 1 + 9) / 3) = sqrt(20/3)
    s = math.sqrt(20 / 3)
    torch.testing.assert_close(out, torch.tensor([-3 / s, -1 / s, 1 / s, 3 / s]))


def test_normalize_advantages_single_valid_entry_is_zero():
    out = normalize_advantages(torch.tensor([5.0, 1.0]), torch.tensor([1, 0]))
    assert torch.equal(out, torch.zeros(2))


# ---------------------------------------------------------------- uniform signature


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_every_estimator_takes_the_common_arguments(name):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    adv = ADVANTAGE_ESTIMATORS.get(name)(
        rewards, mask, group_size=2, scale_by_std=True, eps=1e-6, token_kl=torch.zeros(4, 3), kl_coef=0.1,
        some_future_option=1,
    )
    assert adv.shape == (4, 3) and adv.dtype == torch.float32
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))


def test_kl_folding_flag():
    assert folds_kl_into_reward(compute_reinforce_pp_advantages)
    assert folds_kl_into_reward(compute_reinforce_pp_baseline_advantages)
    assert not folds_kl_into_reward(compute_grpo_advantages) and not folds_kl_into_reward(compute_rloo_advantages)


# ---------------------------------------------------------------- RLOO


def test_rloo_by_hand():
    # Group 1: r_i - mean(others): 1 - 1/3 = 2/3, 0 - 2/3 = -2/3. Group 2 is constant: 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv = compute_rloo_advantages(rewards, torch.ones(8, 2), group_size=4)
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected[:, None].expand(8, 2))
    assert torch.equal(adv[4:], torch.zeros(4, 2))


def test_rloo_three_and_group_of_one():
    # [3, 0, 0]: 3 - 0 = 3, 0 - 1.5 = -1.5 (twice).
    adv = compute_rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), torch.ones(3, 1), group_size=3)
    torch.testing.assert_close(adv[:, 0], torch.tensor([3.0, -1.5, -1.5]))
    assert torch.equal(compute_rloo_advantages(torch.tensor([1.0, 2.0]), torch.ones(2, 1), group_size=1), torch.zeros(2, 1))


# ---------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_without_kl_whitens_rewards_over_tokens():
    # Returns (gamma=1, no KL) equal the reward on every valid token: tokens [1, 1, 0, 0, 0];
    # mean 0.4, unbiased std sqrt((2 * 0.36 + 3 * 0.16) / 4) = sqrt(0.3).
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = compute_reinforce_pp_advantages(rewards, mask, group_size=1, eps=0.0)
    s = math.sqrt(0.3)
    expected = torch.tensor([[0.6 / s, 0.6 / s, 0.0], [-0.4 / s, -0.4 / s, -0.4 / s]])
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_returns_with_kl_by_hand():
    # Row 0: 3 valid tokens, KL [0.1, 0.2, 0.3], coef 0.5, reward 1 at token 2:
    #   token rewards [-0.05, -0.1, -0.15 + 1] -> returns [0.7, 0.75, 0.85].
    # Row 1: 2 valid tokens, KL [0.4, 0.2] (padding KL 9 ignored), reward 0:
    #   token rewards [-0.2, -0.1] -> returns [-0.3, -0.1].
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, 9.0]])
    adv = compute_reinforce_pp_advantages(rewards, mask, group_size=2, token_kl=kl, kl_coef=0.5, eps=0.0)
    returns = torch.tensor([0.7, 0.75, 0.85, -0.3, -0.1])
    mean, std = returns.mean(), returns.std()
    white = (returns - mean) / std
    expected = torch.tensor([[white[0], white[1], white[2]], [white[3], white[4], 0.0]])
    torch.testing.assert_close(adv, expected)
    # kl_coef 0 ignores the KL.
    no_kl = compute_reinforce_pp_advantages(rewards, mask, group_size=2, token_kl=kl, kl_coef=0.0)
    torch.testing.assert_close(no_kl, compute_reinforce_pp_advantages(rewards, mask, group_size=2))


def test_reinforce_pp_row_without_valid_tokens_gets_nothing():
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    adv = compute_reinforce_pp_advantages(torch.tensor([1.0, 5.0, 0.0]), mask, group_size=1, eps=0.0)
    # Valid returns [1, 1, 0]: mean 2/3, std sqrt(1/3).
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([[1 / 3 / s, 1 / 3 / s], [0.0, 0.0], [-2 / 3 / s, 0.0]]))


def test_reinforce_pp_baseline_centres_per_group_then_whitens():
    # Group means 0.5 and 2: centred [0.5, -0.5, 1, -1], each on 2 tokens -> whitened over 8 tokens:
    # mean 0, unbiased std sqrt(2 * (0.25 + 0.25 + 1 + 1) / 7) = sqrt(5/7).
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv = compute_reinforce_pp_baseline_advantages(rewards, torch.ones(4, 2), group_size=2, eps=0.0)
    s = math.sqrt(5 / 7)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -0.5, 1.0, -1.0]) / s)
    torch.testing.assert_close(adv[:, 1], adv[:, 0])


def test_reinforce_pp_baseline_constant_groups_are_zero_before_whitening():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5])
    adv = compute_reinforce_pp_baseline_advantages(rewards, torch.ones(6, 1), group_size=3, eps=0.0)
    # Centred: [0, 0, 0, 0.5, -0.5, 0]; mean 0; std sqrt(0.5 / 5).
    s = math.sqrt(0.1)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, 0.0, 0.0, 0.5 / s, -0.5 / s, 0.0]))
