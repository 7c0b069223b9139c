"""FSDP2 policy-update throughput and memory on N GPUs, with the memory knobs, plus the cost of
gathering full weights for an engine and of a sharded checkpoint.

Launch with torchrun (one process per GPU); rank 0 prints the table:

    torchrun --nproc-per-node 2 bench/fsdp_train.py --device cuda                 # 0.5b and 1.5b
    torchrun --nproc-per-node 2 bench/fsdp_train.py --device cuda --shapes 1.5b --variants fsdp,fsdp+offload
    torchrun --nproc-per-node 2 bench/fsdp_train.py --device cpu --shapes tiny    # smoke test (gloo), < 1 min

Each step is the same RL-shaped mini-batch as bench/train_throughput.py (random Qwen2 of the given
shape, completions of --min-len..--max-len tokens), split over the ranks, one optimizer step per step
through ``posttrain.trainer.policy.policy_update`` (packed micro-batches of --micro-batch-tokens per
rank, chunked logprobs, fused AdamW). Columns:

- tok/s: real tokens per second over all ranks; MFU per GPU: 6 x params x tokens / time / (N x peak).
- peak GiB: the largest torch.cuda.max_memory_allocated of any rank.
- gather s: one pass of ``iter_full_weights`` (512 MiB buckets), what a weight sync to an engine costs.
- ckpt s: one ``ShardedCheckpointManager.save`` (model + optimizer, to --ckpt-dir).

Variants: ``fsdp`` (float32 master weights, bf16 compute and all-gathers), with suffixes ``+ckpt``
(activation checkpointing), ``+offload`` (trainer.fsdp_cpu_offload), ``+bf16`` (trainer.param_dtype=bfloat16).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SHAPES, TINY_DEFAULTS, build_model, make_steps  # noqa: E402

from posttrain.checkpoint.sharded import ShardedCheckpointManager  # noqa: E402
from posttrain.config.loader import load_config  # noqa: E402
from posttrain.config.schema import GRPOConfig  # noqa: E402
from posttrain.distributed import (  # noqa: E402
    all_reduce_sum, barrier, broadcast_object, destroy_process_group, get_rank, get_world_size, init_process_group, iter_full_weights,
)
from posttrain.distributed.process_group import all_reduce_max  # noqa: E402
from posttrain.models.loading import autocast_context  # noqa: E402
from posttrain.trainer.memory import prepare_for_training  # noqa: E402
from posttrain.trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from posttrain.trainer.policy import policy_update  # noqa: E402

SUFFIXES = {"ckpt": ["model.gradient_checkpointing=true"], "offload": ["trainer.fsdp_cpu_offload=true"],
            "bf16": ["trainer.param_dtype=bfloat16"]}


def run_variant(name: str, shape: str, steps, args, device: torch.device) -> dict:
    base, *suffixes = name.split("+")
    if base != "fsdp" or any(s not in SUFFIXES for s in suffixes):
        raise ValueError(f"unknown variant {name!r}: fsdp with suffixes +{', +'.join(SUFFIXES)}")
    world = get_world_size()
    overrides = [f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "rollout.group_size=1",
                 "algorithm.advantage=reinforce_plus_plus",
                 f"rollout.max_new_tokens={args.max_len}", f"trainer.num_processes={world}"]
    for suffix in suffixes:
        overrides += SUFFIXES[suffix]
    cfg = load_config(GRPOConfig, None, overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = autocast_context(device, dtype)
    model = build_model(shape, device, cfg.model.attn_implementation, cfg.model.gradient_checkpointing)
    num_params = sum(p.numel() for p in model.parameters())
    prepare_for_training(model, cfg.trainer, device, dtype)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, len(steps))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    losses = []

    def step(samples) -> None:
        samples = samples[: len(samples) // world * world]  # equal shares: one rank's is every world-th
        cfg.rollout.batch_size = cfg.trainer.mini_batch_size = len(samples)
        metrics = policy_update(model, optimizer, scheduler, samples[get_rank()::world], 0, device, autocast,
                                algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                                moe_cfg=cfg.moe)
        losses.append(metrics["loss/policy"])  # already summed over ranks: the mini-batch's loss

    for samples in steps[: args.warmup]:
        step(samples)
    sync()
    barrier()
    start = time.perf_counter()
    for samples in steps[args.warmup:]:
        step(samples)
    sync()
    elapsed = all_reduce_max(time.perf_counter() - start)
    tokens = sum(s.num_tokens for samples in steps[args.warmup:] for s in samples[: len(samples) // world * world])
    peak = all_reduce_max(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))

    start = time.perf_counter()
    gathered = 0
    for bucket in iter_full_weights(model, bucket_bytes=512 * 2**20, device=device):
        gathered += sum(t.numel() for _, t in bucket)
    sync()
    gather_s = all_reduce_max(time.perf_counter() - start)
    assert int(all_reduce_sum([gathered])[0]) == world * sum(p.numel() for p in model.parameters())

    ckpt_dir = tempfile.mkdtemp(dir=args.ckpt_dir) if get_rank() == 0 else None
    ckpt_dir = broadcast_object(ckpt_dir)
    start = time.perf_counter()
    ShardedCheckpointManager(ckpt_dir, keep_last=1).save(1, model, None, {}, optimizer, scheduler)
    ckpt_s = all_reduce_max(time.perf_counter() - start)
    if get_rank() == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return dict(tokens_per_s=tokens / elapsed, mfu=6 * num_params * tokens / elapsed / (world * args.peak_tflops * 1e12),
                peak_gib=peak, gather_s=gather_s, ckpt_s=ckpt_s, params=num_params, losses=losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="0.5b,1.5b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--variants", default="fsdp,fsdp+ckpt,fsdp+bf16,fsdp+offload")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="per rank (default 16384; tiny: 1024)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="all ranks together (default 4 x budget x N)")
    parser.add_argument("--min-len", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100/H200 bf16 dense: 989)")
    parser.add_argument("--losses", action="store_true",
                        help="print every step's loss (compare runs with different --nproc-per-node on the same "
                        "--tokens-per-step: the same data, so the same loss curve within bf16 tolerance)")
    parser.add_argument("--ckpt-dir", default=None, help="where the checkpoint timing writes (default: system temp)")
    args = parser.parse_args()
    device = init_process_group(torch.device(args.device), timeout_s=600)
    world, main_rank = get_world_size(), get_rank() == 0
    if main_rank:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"# fsdp_train {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {world} x {name} | "
              f"torch {torch.__version__}")
        print("# command: torchrun --nproc-per-node", world, " ".join(sys.argv))
    rows = []
    for shape in args.shapes.split(","):
        shape_args = argparse.Namespace(**vars(args))
        for key, default in dict(min_len=100, max_len=1024, micro_batch_tokens=16384).items():
            if getattr(args, key) is None:
                setattr(shape_args, key, TINY_DEFAULTS[key] if shape == "tiny" else default)
        tokens_per_step = args.tokens_per_step or 4 * shape_args.micro_batch_tokens * world
        steps = make_steps(args.warmup + args.steps, tokens_per_step, shape_args.min_len, shape_args.max_len,
                           SHAPES[shape]["vocab_size"], seed=1)
        for variant in args.variants.split(","):
            try:
                rows.append((shape, variant, run_variant(variant, shape, steps, shape_args, device)))
            except Exception as e:  # report and go on
                rows.append((shape, variant, f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if main_rank:
        print("\n| shape | variant | ranks | tok/s | MFU/GPU | peak GiB | gather s | ckpt s |\n|---|---|---|---|---|---|---|---|")
        for shape, variant, r in rows:
            if isinstance(r, str):
                print(f"| {shape} | {variant} | {world} | {r} | | | | |")
            else:
                print(f"| {shape} | {variant} | {world} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                      f"{r['peak_gib']:.1f} | {r['gather_s']:.2f} | {r['ckpt_s']:.2f} |")
        if args.losses:
            for shape, variant, r in rows:
                if not isinstance(r, str):
                    print(f"losses {shape} {variant} ranks={world}: " + " ".join(f"{x:.6f}" for x in r["losses"]))
    destroy_process_group()


if __name__ == "__main__":
    main()
