"""Which config schema each CLI command uses. A new trainer adds one line here and one in cli.py."""

from __future__ import annotations

from posttrain.config.dpo_schema import DPOConfig
from posttrain.config.ppo_schema import PPOConfig
from posttrain.config.schema import GRPOConfig
from posttrain.config.sft_schema import SFTConfig

SCHEMAS: dict[str, type] = {
    "grpo": GRPOConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
}
