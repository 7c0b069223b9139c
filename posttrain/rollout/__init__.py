"""Where training samples come from: posttrain's engine or transformers (``builder``), an
OpenAI-compatible server (``openai_engine``), multi-turn episodes, and the rollout API.

``SamplingParams``, ``Completion`` and ``RolloutEngine`` live in :mod:`posttrain.sampling` (the
shared vocabulary); they are re-exported here for ``from posttrain.rollout import SamplingParams``.
"""

from posttrain.sampling import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
