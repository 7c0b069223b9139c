"""``posttrain serve``: load a model into an HFEngine and serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.server")


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; the exit code of ``posttrain serve``."""
    if getattr(args, "proxy", "") or getattr(args, "prompt_config", "") or getattr(args, "dry_run", False):
        from posttrain.server.proxy import serve_proxy  # a prompt proxy: no model to load

        return serve_proxy(args)
    try:
        import uvicorn

        from posttrain.server.app import create_app
    except ImportError as exc:
        print(f"posttrain: error: `posttrain serve` needs the serve extra ({exc.name} is missing): "
              "pip install 'posttrain[serve]'", file=sys.stderr)
        return 1
    from posttrain.config.schema import ModelConfig  # heavy imports only now
    from posttrain.models.loading import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
    from posttrain.rollout.hf_engine import HFEngine

    try:
        cfg = ModelConfig(path=args.model, device=args.device, dtype=args.dtype)
        device = resolve_device(cfg.device)
        model, tokenizer = load_model_and_tokenizer(cfg, device)
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 1
    model.eval()
    engine = HFEngine(model, tokenizer, compute_dtype=resolve_compute_dtype(cfg.dtype, device))
    max_prompt_tokens = args.max_prompt_tokens or getattr(model.config, "max_position_embeddings", None) or 4096
    app = create_app(
        engine, tokenizer, args.served_model_name or args.model,
        max_request_bytes=args.max_request_bytes, max_prompt_tokens=max_prompt_tokens, max_queue=args.max_queue,
        max_n=args.max_n, max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
        enable_tensor_updates=getattr(args, "enable_tensor_updates", False),
    )
    logger.info("serving %s on http://%s:%d (device %s)", args.model, args.host, args.port, device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
