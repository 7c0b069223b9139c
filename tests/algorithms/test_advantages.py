from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import compute_grpo_advantages, normalize_advantages

EPS = 1e-6


def test_grpo_scaled_by_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = compute_grpo_advantages(rewards, group_size=4)
    # Group 1: mean 0.5, deviations +-0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    a = 0.5 / (math.sqrt(1 / 3) + EPS)  # ~0.866
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_grpo_uses_bessel_correction():
    # Unbiased std of [0, 1, 2] is 1 (biased would be sqrt(2/3)).
    adv = compute_grpo_advantages(torch.tensor([0.0, 1.0, 2.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + EPS))


def test_grpo_without_std_is_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = compute_grpo_advantages(rewards, group_size=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_groups_are_contiguous():
    rewards = torch.tensor([2.0, 0.0, 5.0, 3.0])
    adv = compute_grpo_advantages(rewards, group_size=2, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_constant_groups_give_exact_zeros(scale_by_std):
    # 0.1 is not exactly representable: the group mean may differ from it by an ulp.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0, 0.0])
    adv = compute_grpo_advantages(rewards, group_size=4, scale_by_std=scale_by_std)
    assert torch.equal(adv, torch.zeros(12))


def test_group_of_one_is_zero_not_nan():
    adv = compute_grpo_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_integer_rewards_are_promoted_to_float():
    adv = compute_grpo_advantages(torch.tensor([1, 0]), group_size=2, scale_by_std=False)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of the group size"):
        compute_grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="1-D"):
        compute_grpo_advantages(torch.zeros(2, 4), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        compute_grpo_advantages(torch.zeros(4), group_size=0)


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
