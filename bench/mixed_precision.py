"""Does an update with bf16 parameters learn like float32? float32 parameters (bf16 autocast, the
default), pure bf16 parameters, and bf16 parameters with float32 masters (trainer.master_weights)
train the same randomly initialised model on the same task; printed per mode: the training loss
over the steps, how far the weights moved compared with the float32 run, peak memory and time.

The task: memorise --sequences fixed random token sequences (next-token cross-entropy), two
micro-batches per optimizer step (so gradient accumulation is exercised), AdamW at --lr (the GRPO
default 2e-5), gradient clipping at 1, through posttrain's build_optimizer and clip_and_step.
Random weights of a real shape (std 0.02) sit where a pretrained model's do: most are larger than
|w| = 256 x lr, so a pure-bf16 AdamW step rounds them back to where they were.

    python bench/mixed_precision.py --device cuda --shape 0.5b --steps 20
    python bench/mixed_precision.py --device cpu --shape tiny --steps 20      # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from posttrain.config.schema import TrainerConfig
from posttrain.models.loading import autocast_context
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.optim import build_optimizer, clip_and_step

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_throughput import SHAPES  # noqa: E402  (the same model shapes as the throughput benchmark)

MODES = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "bf16master": ("bfloat16", True)}


def run(mode: str, args, device: torch.device, sequences: torch.Tensor) -> dict:
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[args.shape], pad_token_id=0, eos_token_id=2, bos_token_id=1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # every mode starts from the same bf16-representable weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    start = [p.detach().to("cpu", torch.bfloat16) for p in model.parameters()]  # exact: representable
    cfg = TrainerConfig(lr=args.lr)
    cfg.param_dtype, cfg.master_weights = MODES[mode]
    prepare_for_training(model, cfg, device, torch.bfloat16)
    optimizer = build_optimizer(model, cfg)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = autocast_context(device, compute)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, began = [], time.perf_counter()
    for _ in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in sequences.chunk(2):
            with autocast():
                loss = model(input_ids=micro, labels=micro, use_cache=False).loss / 2
            loss.backward()
            total += loss.detach()
        clip_and_step(optimizer, model.parameters(), 1.0)
        losses.append(total)
    with torch.no_grad(), autocast():
        final = sum(float(model(input_ids=m, labels=m, use_cache=False).loss) for m in sequences.chunk(2)) / 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    deltas = [(p.detach().to("cpu", torch.float32) - s.float()) for p, s in zip(model.parameters(), start)]
    moved = sum(int((d != 0).sum()) for d in deltas) / sum(d.numel() for d in deltas)
    return dict(losses=[float(x) for x in losses], final=final, deltas=deltas, moved=moved, seconds=seconds, peak=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="0.5b", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# mixed_precision {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print("# command: python " + " ".join(sys.argv))
    g = torch.Generator().manual_seed(1)
    sequences = torch.randint(3, SHAPES[args.shape]["vocab_size"], (args.sequences, args.length), generator=g).to(device)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run(mode, args, device, sequences)
        r = results[mode]
        print(f"  {mode}: loss {r['losses'][0]:.4f} -> {r['final']:.4f}, weights moved {100 * r['moved']:.1f}%, "
              f"{r['seconds']:.1f} s, peak {r['peak']:.1f} GiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference = results.get("float32")
    print()
    print(f"| mode | loss at step 1 | after {args.steps} steps | loss drop vs float32 | weights moved | "
          "distance from float32's weight change | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        if reference is not None:
            ref_drop = reference["losses"][0] - reference["final"]
            drop = f"{100 * (r['losses'][0] - r['final']) / ref_drop:.0f}%"
            num = sum(float((d - e).square().sum()) for d, e in zip(r["deltas"], reference["deltas"]))
            den = sum(float(e.square().sum()) for e in reference["deltas"])
            distance = f"{(num / den) ** 0.5:.3f}"
        else:
            drop = distance = "-"
        print(f"| {mode} | {r['losses'][0]:.4f} | {r['final']:.4f} | {drop} | {100 * r['moved']:.1f}% | {distance} | "
              f"{r['peak']:.1f} |")


if __name__ == "__main__":
    main()
