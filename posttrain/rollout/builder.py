"""``build_engine``: the one place where ``rollout.backend`` becomes an engine."""

from __future__ import annotations

import logging
from typing import Any

import torch

from posttrain.config.cluster_schema import EngineConfig
from posttrain.config.derived import validation_max_new_tokens
from posttrain.config.rollout_schema import RolloutConfig
from posttrain.engine import Engine
from posttrain.engine.paged_model import SUPPORTED_MODEL_TYPES
from posttrain.models.loading import autocast_context
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.openai_engine import OpenAIEngine
from posttrain.sampling import RolloutEngine, eos_token_ids

logger = logging.getLogger("posttrain.rollout")


def build_engine(rollout: RolloutConfig, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype, *,
                 max_model_len: int, float32_logits: bool, expert_dtype: str = "auto") -> RolloutEngine:
    """The rollout engine for ``rollout.backend``.

    'hf' generates with ``model``'s own modules (weights shared, nothing to sync); 'openai' sends
    requests to ``rollout.base_url`` and gets new weights through the sync section. The keywords
    reach posttrain's engine ('engine'): ``max_model_len`` (``engine_max_model_len``),
    ``model.float32_logits`` and ``moe.expert_dtype`` ('auto' where the config has no moe section)."""
    backend = rollout.backend
    if backend == "engine":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        sharded = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if sharded:
            # FSDP shards the modules the engine would read; generation gathers them per forward instead.
            logger.info("rollout.backend=engine on %d FSDP ranks: generating with transformers (backend=hf)",
                        torch.distributed.get_world_size())
        elif model_type in SUPPORTED_MODEL_TYPES:
            return _posttrain_engine(rollout.engine, model, tokenizer, compute_dtype, max_model_len=max_model_len,
                                     float32_logits=float32_logits, expert_dtype=expert_dtype)
        else:
            logger.warning("rollout.backend=engine supports %s, not %r: generating with transformers (backend=hf) instead",
                           ", ".join(SUPPORTED_MODEL_TYPES), model_type)
        backend = "hf"
    if expert_dtype != "auto":
        logger.warning("moe.expert_dtype=%s applies to posttrain's engine only; rollout.backend=%s generates with "
                       "the model's own experts in model.dtype", expert_dtype, backend)
    if backend == "hf":
        return HFEngine(model, tokenizer, generation_batch_size=rollout.generation_batch_size,
                        compute_dtype=compute_dtype)
    if backend == "openai":
        r = rollout
        device = next(model.parameters()).device
        return OpenAIEngine(r.base_url, tokenizer, api_key=r.api_key, model_name=r.model_name,
                            max_concurrency=r.max_concurrency, timeout_s=r.request_timeout_s,
                            eos_token_ids=eos_token_ids(tokenizer, model), autocast=autocast_context(device, compute_dtype))
    raise ValueError(f"unknown rollout.backend '{backend}'")


def engine_max_model_len(cfg: Any, model: torch.nn.Module) -> int:
    """rollout.engine.max_model_len, or what the run's prompts and completions can reach."""
    r = cfg.rollout
    if r.engine.max_model_len > 0:
        return r.engine.max_model_len
    turns = getattr(r, "max_turns", 1)
    length = cfg.data.max_prompt_tokens + turns * r.max_new_tokens + (turns - 1) * 512
    if getattr(cfg, "validation", None) is not None:  # validation's completions may be longer
        length = max(length, cfg.data.max_prompt_tokens + turns * validation_max_new_tokens(cfg) + (turns - 1) * 512)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(length, limit) if limit else length


def _posttrain_engine(e: EngineConfig, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype, *,
                      max_model_len: int, float32_logits: bool, expert_dtype: str) -> RolloutEngine:
    return Engine(
        model, tokenizer, max_model_len=max_model_len, compute_dtype=compute_dtype,
        block_size=e.block_size, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
        kv_cache_memory_fraction=e.kv_cache_memory_fraction, cpu_kv_cache_gb=e.cpu_kv_cache_gb,
        cuda_graphs=e.cuda_graphs, enable_prefix_caching=e.enable_prefix_caching, compile=e.compile,
        cpu_dtype=getattr(torch, e.cpu_dtype), float32_logits=float32_logits,
        expert_dtype=expert_dtype, weight_copies=e.weight_copies,
    )
