"""The objective of a policy update built from the algorithm section: which terms enter the
per-token loss, checked against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms import Objective
from posttrain.config.schema import AlgorithmConfig


def _rows():
    # 2 sequences x 3 tokens, the last token of the second is padding. Ratio 1 everywhere
    # (logprobs == old), so PPO's clipped loss per token is -advantage.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    entropy = torch.full((2, 3), 0.5)
    return logprobs, advantages, mask, entropy


def test_policy_loss_kl_and_entropy_terms():
    algo = AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01, loss_agg_mode="token-mean")
    objective = Objective.from_config(algo)
    logprobs, advantages, mask, entropy = _rows()
    ref = logprobs - 0.3  # k1 = logprobs - ref = 0.3 on every token
    per_token, _, terms = objective.token_loss(logprobs, logprobs, advantages, mask, entropy, ref_logprobs=ref)
    expected = -advantages + 0.1 * 0.3 - 0.01 * 0.5
    torch.testing.assert_close(per_token * mask, expected * mask)
    torch.testing.assert_close(terms["kl"], torch.full((2, 3), 0.3))
    loss = objective.aggregate(per_token, mask, num_tokens=5.0, num_sequences=2.0, norm_length=3.0)
    # token-mean over the 5 valid tokens: (3 * (-1) + 2 * 2) / 5 + 0.03 - 0.005
    assert loss.item() == pytest.approx(1 / 5 + 0.03 - 0.005, abs=1e-6)


def test_an_estimator_that_folds_the_kl_into_the_reward_leaves_it_out_of_the_loss():
    algo = AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", advantage="reinforce_plus_plus")
    objective = Objective.from_config(algo)
    assert not objective.kl_in_loss
    logprobs, advantages, mask, entropy = _rows()
    per_token, _, terms = objective.token_loss(logprobs, logprobs, advantages, mask, entropy,
                                               ref_logprobs=logprobs - 0.3)
    torch.testing.assert_close(per_token * mask, -advantages * mask)  # logged, not added
    assert "kl" in terms


def test_off_policy_correction_weights_the_tokens():
    algo = AlgorithmConfig(off_policy_correction="tis_token", off_policy_cap=2.0)
    objective = Objective.from_config(algo)
    logprobs, advantages, mask, entropy = _rows()
    rollout = logprobs - math.log(3.0)  # pi_old / pi_rollout = 3, capped at 2
    per_token, _, terms = objective.token_loss(logprobs, logprobs, advantages, mask, entropy, rollout_logprobs=rollout)
    torch.testing.assert_close(per_token * mask, -2.0 * advantages * mask)
    torch.testing.assert_close(terms["is_weight"] * mask, 2.0 * mask)
    none = Objective.from_config(AlgorithmConfig())
    per_token, _, terms = none.token_loss(logprobs, logprobs, advantages, mask, entropy, rollout_logprobs=rollout)
    torch.testing.assert_close(per_token * mask, -advantages * mask)
    assert "is_weight" not in terms and "rollout_logprob_diff" in terms


def test_the_router_losses_are_weighed_by_the_moe_router_section():
    from types import SimpleNamespace

    import torch

    from posttrain.algorithms.objective import Objective
    from posttrain.config.schema import GRPOConfig

    algo = GRPOConfig().algorithm
    aux, z = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    dense = Objective.from_config(algo)
    assert float(dense.router_loss(aux, z)) == 0.0  # no router section: no router loss
    moe = Objective.from_config(algo, router=SimpleNamespace(aux_loss_coef=0.01, z_loss_coef=0.001))
    assert float(moe.router_loss(aux, z)) == pytest.approx(0.01 * 3.0 + 0.001 * 30.0)
