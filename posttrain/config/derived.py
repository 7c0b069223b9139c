"""Values the recipes derive from a config, computed in one place (so the recipes, --dry-run and
the engine's sizing agree): each is a pure function of the loaded config."""

from __future__ import annotations

from typing import Any


def validation_max_new_tokens(cfg: Any) -> int:
    """Tokens a validation completion may reach: validation.max_new_tokens, or the rollouts' limit."""
    return cfg.validation.max_new_tokens or cfg.rollout.max_new_tokens


def optimizer_steps_per_step(cfg: Any) -> int:
    """Optimizer steps in one training step of a policy-gradient recipe: every epoch over the
    batch (algorithm.ppo_epochs) takes rollout.batch_size / trainer.mini_batch_size of them. The
    LR schedule counts these, and so do policy versions."""
    return cfg.algorithm.ppo_epochs * (cfg.rollout.batch_size // cfg.trainer.mini_batch_size)
