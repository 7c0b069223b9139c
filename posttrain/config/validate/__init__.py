"""Validation of a loaded config: the checks every schema shares (``common.py``) plus the
cross-field checks of its command, one module per schema beside it in this package.

``validate_config`` raises one ConfigError that lists every problem. The validators import the
schemas and the algorithm registries, never the loader or anything above the config layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from posttrain.config.dpo_schema import DPOConfig
from posttrain.config.ppo_schema import PPOConfig
from posttrain.config.schema import GRPOConfig
from posttrain.config.sft_schema import SFTConfig
from posttrain.config.validate.common import choice_problems, common_problems, nonfinite_problems
from posttrain.config.validate.dpo import dpo_problems
from posttrain.config.validate.grpo import grpo_problems
from posttrain.config.validate.ppo import ppo_problems
from posttrain.config.validate.sft import sft_problems
from posttrain.errors import ConfigError

Validator = Callable[[Any], list[str]]
# The cross-field checks of each schema (exact class: PPOConfig subclasses GRPOConfig's sections,
# and its checks call GRPO's themselves).
VALIDATORS: dict[type, Validator] = {
    GRPOConfig: grpo_problems,
    PPOConfig: ppo_problems,
    SFTConfig: sft_problems,
    DPOConfig: dpo_problems,
}


def validate_config(cfg: Any) -> None:
    """Check allowed values and cross-field constraints; raise one ConfigError listing every problem."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"validate_config expects a config dataclass instance, got {cfg!r}")
    problems = choice_problems(cfg, "") + nonfinite_problems(cfg, "") + common_problems(cfg)
    validator = VALIDATORS.get(type(cfg))
    if validator is not None:
        problems += validator(cfg)
    if len(problems) == 1:
        raise ConfigError(f"Invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError(f"Invalid configuration ({len(problems)} problems):\n"
                          + "\n".join(f"  - {p}" for p in problems))
