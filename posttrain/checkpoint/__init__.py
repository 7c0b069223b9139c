"""posttrain.checkpoint: atomic Hugging Face-format checkpoints plus trainer state, keep-last-K, resume."""

from posttrain.checkpoint.manager import CheckpointManager, checkpoint_name
from posttrain.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointManager", "capture_rng_state", "checkpoint_name", "restore_rng_state"]
