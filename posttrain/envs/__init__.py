"""Reward environments: the interface, the registry, and the worker pool that runs them.

The math environment is imported lazily through the registry (``resolve_env_class("math")``)
so that importing this package does not import sympy.
"""

from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.envs.registry import ENVIRONMENTS, check_env_kwargs, resolve_env_class
from posttrain.envs.reward_pool import RewardPool, ScoredBatch

__all__ = [
    "ENVIRONMENTS",
    "Environment",
    "EnvironmentReturn",
    "MessageLog",
    "RewardPool",
    "ScoredBatch",
    "check_env_kwargs",
    "resolve_env_class",
]
