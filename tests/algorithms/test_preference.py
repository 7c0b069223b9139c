"""DPO/IPO preference losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import PREFERENCE_LOSSES, dpo_loss, sequence_logps, uses_length_average
from posttrain.errors import ConfigError

# Pair 1: log-ratios chosen +1, rejected -1 -> h = 2.  Pair 2: chosen 0, rejected +1 -> h = -1.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])


def _loss(**kwargs):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs)


def test_sigmoid_loss_and_metrics_by_hand():
    losses, metrics = _loss(beta=0.1, loss_type="sigmoid")
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2);  -log sigmoid(0.1 * -1) = log(1 + e^0.1)
    expected = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([0.598138869, 0.744396660], rel=1e-8)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0], abs=1e-7)
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.1], abs=1e-7)
    assert metrics["rewards/margins"].tolist() == pytest.approx([0.2, -0.1], abs=1e-7)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]


def test_label_smoothing_is_conservative_dpo():
    losses, _ = _loss(beta=0.1, loss_type="sigmoid", label_smoothing=0.2)
    # 0.8 * -log sigmoid(0.2) + 0.2 * -log sigmoid(-0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.2)) + 0.2 * math.log(1 + math.exp(0.2))
    assert losses[0].item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.638138869, rel=1e-8)


def test_ipo_loss_by_hand():
    losses, metrics = _loss(beta=0.5, loss_type="ipo")
    # target margin 1 / (2 * 0.5) = 1: (2 - 1)^2 and (-1 - 1)^2
    assert losses.tolist() == pytest.approx([1.0, 4.0])
    assert metrics["rewards/margins"].tolist() == pytest.approx([1.0, -0.5])
    with pytest.raises(ValueError, match="label_smoothing"):
        _loss(beta=0.5, loss_type="ipo", label_smoothing=0.1)


def test_gradient_of_sigmoid_loss():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    rejected = POLICY_REJECTED.clone().requires_grad_()
    losses, metrics = dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.1, loss_type="sigmoid")
    losses[0].backward()
    # d/dh -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2)
    g = 0.1 / (1 + math.exp(0.2))
    assert chosen.grad.tolist() == pytest.approx([-g, 0.0], rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([g, 0.0], rel=1e-6)
    assert not any(v.requires_grad for v in metrics.values())


def test_equal_rewards_are_not_accurate_and_extremes_stay_finite():
    zero = torch.zeros(1)
    _, metrics = dpo_loss(zero, zero, zero, zero, beta=0.1, loss_type="sigmoid")
    assert metrics["rewards/accuracy"].item() == 0.0
    losses, _ = dpo_loss(torch.tensor([1e4, -1e4]), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                         beta=1.0, loss_type="sigmoid")
    assert losses.tolist() == pytest.approx([0.0, 1e4])


def test_sequence_logps_sum_and_length_average():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert sequence_logps(token_logps, mask, average=False).tolist() == [-6.0, -9.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == [-2.0, -4.5]


def test_registry_and_bad_arguments():
    assert {"sigmoid", "ipo"} <= set(PREFERENCE_LOSSES.names())
    assert uses_length_average("ipo") and not uses_length_average("sigmoid")
    with pytest.raises(ConfigError, match="sigmoid"):
        _loss(beta=0.1, loss_type="sigmoidd")
    with pytest.raises(ValueError, match="beta"):
        _loss(beta=0.0, loss_type="sigmoid")
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1, loss_type="sigmoid")
