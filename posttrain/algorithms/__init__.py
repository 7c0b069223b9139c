"""posttrain.algorithms: the algorithm core as pure tensor functions (no models, no I/O).

Advantage estimators, policy losses, KL estimators, entropy and loss aggregation, each
registered by the name the config uses (see :mod:`posttrain.algorithms.registry`).
"""

from __future__ import annotations

from posttrain.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
    get_advantage_estimator,
    get_policy_loss,
)
from posttrain.algorithms.advantages import compute_grpo_advantages, normalize_advantages
from posttrain.algorithms.losses import (
    KL_ESTIMATORS,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    ppo_clip_loss,
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
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "Registry",
    "aggregate_loss",
    "compute_grpo_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "get_advantage_estimator",
    "get_policy_loss",
    "get_preference_loss",
    "kl_penalty",
    "normalize_advantages",
    "ppo_clip_loss",
    "sequence_logps",
    "uses_length_average",
]
