"""``posttrain serve``: load a model into posttrain's engine (or an HFEngine) and serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from posttrain.config.schema import ModelConfig
from posttrain.engine import Engine
from posttrain.engine.paged_model import MOE_MODEL_TYPES, SUPPORTED_MODEL_TYPES
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.loading import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
from posttrain.models.moe import check_expert_dtype
from posttrain.rollout.hf_engine import HFEngine

logger = logging.getLogger("posttrain.server")
DEFAULT_MAX_MODEL_LEN = 8192
EXPERT_DTYPE_OPTION = "--expert-dtype "  # how check_expert_dtype's messages name serve's option


def build_serving_engine(args: argparse.Namespace, model: Any, tokenizer: Any, compute_dtype: Any) -> tuple[Any, int]:
    """The engine ``--engine`` asks for, and the longest prompt it serves."""
    choice = getattr(args, "engine", "auto")
    model_type = getattr(model.config, "model_type", None)
    positions = getattr(model.config, "max_position_embeddings", None)
    if choice == "auto" and model_type not in SUPPORTED_MODEL_TYPES:
        logger.info("posttrain's engine supports %s, not %r: serving with transformers (one request at a time)",
                    ", ".join(SUPPORTED_MODEL_TYPES), model_type)
        choice = "hf"
    expert_dtype = getattr(args, "expert_dtype", "auto")
    if expert_dtype != "auto":
        if choice == "hf":
            raise ConfigError(f"--expert-dtype {expert_dtype} needs posttrain's engine (--engine posttrain, for "
                              f"{', '.join(MOE_MODEL_TYPES)}); transformers computes the experts in the model's dtype.")
        check_expert_dtype(expert_dtype, next(model.parameters()).device, option=EXPERT_DTYPE_OPTION)
    if choice == "hf":
        return HFEngine(model, tokenizer, compute_dtype=compute_dtype), args.max_prompt_tokens or positions or 4096

    max_model_len = args.max_model_len or min(positions or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    if args.max_prompt_tokens >= max_model_len:
        raise ConfigError(f"--max-prompt-tokens {args.max_prompt_tokens} leaves no room to generate within "
                          f"--max-model-len {max_model_len}; lower it or raise --max-model-len.")
    engine = Engine(model, tokenizer, max_model_len=max_model_len, compute_dtype=compute_dtype,
                    max_num_seqs=args.max_num_seqs, kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                    expert_dtype=expert_dtype)
    logger.info("posttrain engine: continuous batching over up to %d sequences of up to %d tokens",
                args.max_num_seqs, max_model_len)
    return engine, args.max_prompt_tokens or max_model_len - 1


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; the exit code of ``posttrain serve``."""
    if getattr(args, "proxy", "") or getattr(args, "prompt_config", "") or getattr(args, "dry_run", False):
        from posttrain.server.proxy import serve_proxy  # a prompt proxy: no model to load

        return serve_proxy(args)
    try:
        # fastapi and uvicorn are the optional serve extra: imported here, so a missing one is a clear error.
        from posttrain.server.app import create_app
        from posttrain.server.uvicorn_run import run_until_signal
    except ImportError as exc:
        print(f"posttrain: error: `posttrain serve` needs the serve extra ({exc.name} is missing): "
              "pip install 'posttrain[serve]'", file=sys.stderr)
        return 1

    try:
        cfg = ModelConfig(path=args.model, device=args.device, dtype=args.dtype)
        device = resolve_device(cfg.device)
        # Before the model loads (minutes for a large one): fp8 experts need a GPU that has them.
        check_expert_dtype(getattr(args, "expert_dtype", "auto"), device, option=EXPERT_DTYPE_OPTION)
        model, tokenizer = load_model_and_tokenizer(cfg, device)
        model.eval()
        compute_dtype = resolve_compute_dtype(cfg.dtype, device)
        engine, max_prompt_tokens = build_serving_engine(args, model, tokenizer, compute_dtype)
    except ConfigError as exc:  # a wrong option or combination: exit 2, as for the trainers
        print(f"posttrain: config error: {exc}", file=sys.stderr)
        return 2
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(
            engine, tokenizer, args.served_model_name or args.model,
            max_request_bytes=args.max_request_bytes, max_prompt_tokens=max_prompt_tokens, max_queue=args.max_queue,
            max_n=args.max_n, max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
            enable_tensor_updates=getattr(args, "enable_tensor_updates", False),
            request_timeout_s=args.request_timeout_s, paused_wait_s=args.paused_wait_s,
            weight_sync_timeout_s=args.weight_sync_timeout_s,
        )
    except ValueError as exc:  # a limit out of range
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 2
    logger.info("serving %s on http://%s:%d (device %s, %s)", args.model, args.host, args.port, device,
                type(engine).__name__)
    run_until_signal(app, args.host, args.port, log_level="info")  # Ctrl-C/SIGTERM: exit 130/143
    return 0
