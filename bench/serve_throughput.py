"""`posttrain serve` under concurrent load: posttrain's engine (continuous batching across
requests) vs the transformers engine (one request at a time).

A random-weight model (speed does not depend on the values) is served over real HTTP on
127.0.0.1; ``--clients`` concurrent clients each send ``--requests`` ``/generate`` requests
(128 random prompt tokens, ``--max-new-tokens`` sampled at temperature 1, so EOS is practically
never drawn). Prints generated tokens/s and request latency (p50, p99) per engine.

  python bench/serve_throughput.py --device cuda --shape qwen2.5-0.5b --clients 64 --requests 4
  python bench/serve_throughput.py --device cpu --shape tiny --clients 8 --requests 2 --max-new-tokens 16  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from posttrain.engine import Engine
from posttrain.rollout.hf_engine import HFEngine
from posttrain.server.app import create_app
from rollout_throughput import SHAPES, _Tok, build_model


class _ServedTok(_Tok):
    """What the server needs besides the engine's needs: a vocabulary size and special ids."""

    all_special_ids: list[int] = []
    chat_template = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size


def _serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return server, thread, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


async def _load(url: str, prompts: list[list[int]], clients: int, max_new_tokens: int) -> tuple[float, list[float], int]:
    latencies, tokens = [], 0
    queue = list(prompts)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            body = {"input_ids": prompt, "sampling_params": {"temperature": 1.0, "max_new_tokens": max_new_tokens}}
            start = time.perf_counter()
            resp = await http.post("/generate", json=body)
            resp.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += len(resp.json()["output_ids"])

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies, tokens


def run(engine_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    model = build_model(args.shape, device, dtype)
    vocab = model.config.vocab_size
    tok = _ServedTok(vocab)
    if engine_name == "posttrain":
        engine = Engine(model, tok, max_model_len=128 + args.max_new_tokens, compute_dtype=dtype,
                        max_num_seqs=args.max_num_seqs, kv_cache_memory_fraction=0.8)
    else:
        engine = HFEngine(model, tok, compute_dtype=dtype)
    app = create_app(engine, tok, args.shape, max_queue=args.clients, max_tokens_limit=args.max_new_tokens)
    server, thread, url = _serve(app)
    try:
        g = torch.Generator().manual_seed(0)
        warm = torch.randint(3, vocab, (min(args.clients, 8), 128), generator=g).tolist()
        asyncio.run(_load(url, warm, len(warm), min(8, args.max_new_tokens)))  # compile, graphs, allocator
        prompts = torch.randint(3, vocab, (args.clients * args.requests, 128), generator=g).tolist()
        seconds, latencies, tokens = asyncio.run(_load(url, prompts, args.clients, args.max_new_tokens))
    finally:
        server.should_exit = True
        thread.join(30)
    latencies.sort()
    return {"tokens/s": tokens / seconds, "p50 s": statistics.median(latencies),
            "p99 s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "seconds": seconds,
            "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--engines", default="posttrain,hf")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    rows = [(name, run(name, args, device, dtype)) for name in args.engines.split(",")]
    print(f"\n{args.shape} on {device}, {args.clients} clients x {args.requests} requests, "
          f"128 prompt + {args.max_new_tokens} new tokens")
    print(f"{'engine':<10} {'tokens/s':>10} {'p50 s':>8} {'p99 s':>8} {'wall s':>8}")
    for name, r in rows:
        print(f"{name:<10} {r['tokens/s']:>10.0f} {r['p50 s']:>8.2f} {r['p99 s']:>8.2f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
