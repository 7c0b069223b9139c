"""Time one GRPO step's parts (generate, train) for the SmolLM2-135M shape with random weights.

Speed does not depend on weight values, so a random init of the real architecture measures the
same as the real model. Usage: python bench/grpo_step_time.py [--backend engine|hf] [--batch 128] [--new-tokens 200] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.config.schema import GRPOConfig
from posttrain.models import resolve_compute_dtype
from posttrain.rollout import SamplingParams
from posttrain.engine import Engine
from posttrain.rollout.hf_engine import HFEngine
from posttrain.trainer.policy import policy_update
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.samples import Sample

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)


class _Tok:
    """Just what HFEngine needs from a tokenizer (ids only; text is not timed)."""

    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--generation-batch", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--backend", default="engine", choices=["engine", "hf"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (generate, sleep, train)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_compute_dtype("auto", device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, eos_token_id=2, pad_token_id=0)).to(device)
    model.generation_config.max_length = None
    if args.backend == "engine":
        engine = Engine(model, _Tok(), max_model_len=args.prompt_tokens + args.new_tokens, compute_dtype=dtype)
    else:
        engine = HFEngine(model, _Tok(), generation_batch_size=args.generation_batch, compute_dtype=dtype)
    prompts = [torch.randint(3, 49152, (args.prompt_tokens,)).tolist() for _ in range(args.batch // 8)]
    params = SamplingParams(n=8, temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True)
    # eos never sampled: suppress it so every completion has exactly new_tokens tokens
    model.generation_config.suppress_tokens = [2]

    cfg = GRPOConfig()
    cfg.trainer.micro_batch_size = args.micro_batch
    cfg.trainer.mini_batch_size = args.batch
    cfg.rollout.batch_size = args.batch
    cfg.rollout.max_new_tokens = args.new_tokens
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 10)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Warm-up of both phases first, so the timed rollout's logprobs match the weights it trains.
    warm = [c for g in engine.generate(prompts[:2], SamplingParams(n=2, max_tokens=8)) for c in g]
    policy_update(model, optimizer, scheduler, [Sample(c.prompt_token_ids, c.token_ids, c.logprobs, 1.0, 0.0) for c in warm],
                  0, device, engine.autocast,
                  algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model, moe_cfg=cfg.moe)
    print(f"device={device} dtype={dtype} backend={args.backend} batch={args.batch} new_tokens={args.new_tokens}")
    print("| step | generate s | gen tok/s | wake+sleep s | train s | train tok/s | peak GiB | logprob diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        sync(); t0 = time.perf_counter()
        engine.wake()  # in the recipe generate() wakes the engine; timed apart to show graph reuse
        t_wake = time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = engine.generate(prompts, params)
        sync(); t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.sleep()
        sync(); t_sleep = time.perf_counter() - t0
        completions = [c for g in groups for c in g]
        n_tokens = sum(len(c.token_ids) for c in completions)
        samples = [Sample(c.prompt_token_ids, c.token_ids, c.logprobs, 1.0 if i % 2 else -1.0, 0.0) for i, c in enumerate(completions)]
        sync(); t0 = time.perf_counter()
        metrics = policy_update(model, optimizer, scheduler, samples, 0, device, engine.autocast,
                                algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                                moe_cfg=cfg.moe)
        sync(); t_train = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        train_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        print(f"| {step} | {t_gen:.2f} | {n_tokens / t_gen:.0f} | {t_wake + t_sleep:.3f} | {t_train:.2f} | "
              f"{train_tokens / t_train:.0f} | {peak:.1f} | {metrics['actor/logprob_diff']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
