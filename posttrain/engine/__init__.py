"""posttrain's own generation engine: paged KV cache, continuous batching, prefix sharing, CUDA
graphs. Modules: ``sequence`` (one sequence's state), ``block_manager`` (KV blocks, ref counts,
prefix cache), ``scheduler`` (what runs next), ``model_runner`` (how it runs: inputs, cache,
graphs), ``paged_model`` (the model's forward over the paged cache), ``attention`` (kernels),
``sampler`` and ``llm_engine`` (the ``RolloutEngine``). See docs/engine.md."""

from posttrain.engine.llm_engine import Engine

__all__ = ["Engine"]
