"""posttrain.algorithms: the algorithm core as pure tensor functions (no models, no I/O).

Advantage estimators, policy losses, KL estimators, entropy, loss aggregation and off-policy
corrections, each registered by the name the config uses (see :mod:`posttrain.algorithms.registry`).
"""

from __future__ import annotations

from posttrain.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    Registry,
    get_advantage_estimator,
    get_off_policy_correction,
    get_policy_loss,
)
from posttrain.algorithms.advantages import (
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_reinforce_pp_baseline_advantages,
    compute_rloo_advantages,
    folds_kl_into_reward,
    normalize_advantages,
)
from posttrain.algorithms.losses import (
    KL_ESTIMATORS,
    aggregate_loss,
    entropy_from_logits,
    gspo_loss,
    kl_penalty,
    ppo_clip_loss,
)
from posttrain.algorithms.off_policy import (
    masked_sequence_counts,
    OffPolicyCorrection,
    off_policy_metrics,
    resolved_off_policy_correction,
    truncated_is_weights,
)
from posttrain.algorithms.shaping import informative_groups, overlong_penalty
from posttrain.algorithms.objective import Objective
from posttrain.algorithms.value import (
    compute_gae,
    compute_gae_advantages,
    explained_variance,
    rlhf_token_rewards,
    value_loss,
)
from posttrain.algorithms.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    get_preference_loss,
    sequence_logps,
    uses_length_average,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "OFF_POLICY_CORRECTIONS",
    "Objective",
    "OffPolicyCorrection",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "Registry",
    "aggregate_loss",
    "compute_gae",
    "compute_gae_advantages",
    "compute_grpo_advantages",
    "compute_reinforce_pp_advantages",
    "compute_reinforce_pp_baseline_advantages",
    "compute_rloo_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "folds_kl_into_reward",
    "get_advantage_estimator",
    "get_off_policy_correction",
    "get_policy_loss",
    "get_preference_loss",
    "gspo_loss",
    "informative_groups",
    "kl_penalty",
    "normalize_advantages",
    "masked_sequence_counts",
    "off_policy_metrics",
    "overlong_penalty",
    "ppo_clip_loss",
    "resolved_off_policy_correction",
    "rlhf_token_rewards",
    "sequence_logps",
    "truncated_is_weights",
    "uses_length_average",
    "value_loss",
]
