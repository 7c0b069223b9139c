"""The objective of a policy update, built once from the ``algorithm`` section (and, for an MoE
policy, ``moe.router``): which policy loss (by registered name) with which clip options, the KL to
the reference (in the loss, or folded into the reward by the advantage estimator), the entropy
bonus, the off-policy correction, how the per-token loss becomes one number, and the weights of an
MoE router's load-balancing and z losses. The trainer computes log-probabilities and the routers'
per-layer losses, and adds what this returns.

Pure tensor functions over ``(batch, response_len)`` rows; nothing here touches a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from posttrain.algorithms.advantages import folds_kl_into_reward
from posttrain.algorithms.losses import aggregate_loss, kl_penalty
from posttrain.algorithms.off_policy import OffPolicyCorrection, resolved_off_policy_correction
from posttrain.algorithms.registry import get_policy_loss


@dataclass(frozen=True)
class Objective:
    """The per-token loss of a policy update and its aggregation (see the module docstring)."""

    policy_loss: Callable[..., tuple[Tensor, dict[str, Any]]]
    loss_options: dict[str, float]  # keyword options every policy loss takes (each uses its own)
    correction: OffPolicyCorrection
    kl_estimator: str
    kl_coef: float
    kl_in_loss: bool  # False when the advantage estimator already put the KL into the reward
    entropy_coef: float
    loss_agg_mode: str
    router_aux_coef: float = 0.0  # MoE: moe.router.aux_loss_coef (load balancing, Switch Transformer)
    router_z_coef: float = 0.0  # MoE: moe.router.z_loss_coef (ST-MoE)

    @classmethod
    def from_config(cls, algo: Any, router: Any = None) -> Objective:
        """The objective of an ``algorithm`` config section (GRPO's or PPO's); ``router``: the
        ``moe.router`` section for an MoE policy (its loss coefficients), else None."""
        return cls(
            policy_loss=get_policy_loss(algo.policy_loss),
            loss_options=dict(clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
                              dual_clip_c=algo.dual_clip_c, gspo_clip_low=algo.gspo_clip_low,
                              gspo_clip_high=algo.gspo_clip_high),
            correction=resolved_off_policy_correction(algo),
            kl_estimator=algo.kl_estimator,
            kl_coef=algo.kl_coef,
            kl_in_loss=not folds_kl_into_reward(algo.advantage),
            entropy_coef=algo.entropy_coef,
            loss_agg_mode=algo.loss_agg_mode,
            router_aux_coef=router.aux_loss_coef if router is not None else 0.0,
            router_z_coef=router.z_loss_coef if router is not None else 0.0,
        )

    def with_policy_loss(self, policy_loss: Callable[..., tuple[Tensor, dict[str, Any]]]) -> Objective:
        """The same objective with ``policy_loss`` replaced (e.g. by its compiled version)."""
        return dataclasses.replace(self, policy_loss=policy_loss)

    def token_loss(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, entropy: Tensor,
                   rollout_logprobs: Tensor | None = None,
                   ref_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """The per-token loss ``(N, T)`` with every term of the objective, the policy loss's own
        metrics, and the per-token quantities to log as masked means (entropy, logprob gaps, KL,
        importance weights).

        ``old_logprobs`` are the proximal policy's (the ratio's denominator); ``rollout_logprobs``
        the engine's that sampled the tokens (the off-policy correction's behaviour policy), when
        they differ; ``ref_logprobs`` the reference model's, when the run has one."""
        per_token, metrics = self.policy_loss(logprobs, old_logprobs, advantages, mask, **self.loss_options)
        terms = {"entropy": entropy, "logprob_diff": (logprobs - old_logprobs).abs()}
        if rollout_logprobs is not None:
            terms["rollout_logprob_diff"] = (old_logprobs - rollout_logprobs).abs()
            if self.correction.name != "none":
                weights = self.correction.weights(old_logprobs, rollout_logprobs, mask)
                per_token = per_token * weights
                terms["is_weight"] = weights
        if ref_logprobs is not None:
            kl = kl_penalty(logprobs, ref_logprobs, self.kl_estimator)
            if self.kl_in_loss:
                per_token = per_token + self.kl_coef * kl
            terms["kl"] = kl
        if self.entropy_coef > 0:
            per_token = per_token - self.entropy_coef * entropy
        return per_token, metrics, terms

    def router_loss(self, aux_per_layer: Tensor, z_per_layer: Tensor) -> Tensor:
        """An MoE policy's router loss: ``aux_coef * sum_layers load_balancing + z_coef * sum_layers z``
        (the per-layer losses as the trainer measured them, already token-weighted)."""
        return self.router_aux_coef * aux_per_layer.sum() + self.router_z_coef * z_per_layer.sum()

    def aggregate(self, per_token: Tensor, mask: Tensor, *, num_tokens: float, num_sequences: float,
                  norm_length: float) -> Tensor:
        """One loss from the per-token loss, by ``algorithm.loss_agg_mode`` (normalisers: the
        mini-batch's global token and sequence counts, so micro-batch splits do not change it)."""
        return aggregate_loss(per_token, mask, self.loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences,
                              norm_length=norm_length)
