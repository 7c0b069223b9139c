"""Rollout engines: generation of completions for training and validation."""

from posttrain.rollout.base import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
