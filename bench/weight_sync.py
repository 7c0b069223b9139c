"""Weight sync timings: shared, checkpoint (save + load to the device), broadcast, lora.

A random-init model of the chosen shape plays the trainer; a second copy on the device plays
the engine, and each mode moves the trainer's weights into it with the same code the trainer
and `posttrain serve` use (minus HTTP). Prints a table (median of --repeats runs).

  python bench/weight_sync.py --device cuda --shape qwen2.5-0.5b
  python bench/weight_sync.py --device cpu --shape tiny            # smoke test, seconds

broadcast needs a second process: with 2+ GPUs it uses NCCL (receiver on cuda:1); on one GPU
(NCCL refuses two ranks on one device) or on CPU it uses gloo through CPU memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from posttrain.models.weights import iter_weight_buckets, load_named_tensors  # noqa: E402
from posttrain.sync.base import DTYPES, transfer_dir  # noqa: E402
from posttrain.sync.broadcast import WeightGroup, master_store  # noqa: E402
from posttrain.sync.checkpoint import StagingBuffer, save_weights  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape])).to(dtype).eval()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocations, file creation)
    times = []
    for _ in range(repeats):
        sync_device(device)
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nbytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(t.numel() * t.element_size() for b in iter_weight_buckets(model, trainable_only=trainable_only) for _, t in b)


# -- broadcast: the receiver runs in its own process ------------------------------------------------


def _receiver(shape, device_name, dtype_name, port, backend, bucket_mb, rounds, ready):
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    engine = build(shape, device, DTYPES[dtype_name], seed=1)
    group = WeightGroup("127.0.0.1", port, 1, 2, "bench", backend, timeout_s=300)
    ready.set()
    wire = device if backend == "nccl" else torch.device("cpu")
    for _ in range(rounds):
        for bucket in iter_weight_buckets(engine, bucket_mb):  # same names, shapes, order as the sender
            received = {n: group.broadcast(torch.empty(t.shape, dtype=t.dtype, device=wire)) for n, t in bucket}
            load_named_tensors(engine, received)
        group.broadcast(torch.zeros(1, device=wire))  # end of round: the sender's clock stops here
    group.close()


def bench_broadcast(trainer, args, device, repeats) -> tuple[float, str]:
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
    backend = "nccl" if two_gpus else "gloo"
    receiver_device = "cuda:1" if two_gpus else ("cuda:0" if device.type == "cuda" else "cpu")
    store = master_store("127.0.0.1", 0, 2, timeout_s=300)  # listening before the receiver is told its port
    port = store.port
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_receiver, args=(args.shape, receiver_device, args.dtype, port, backend, args.bucket_mb,
                                               repeats + 1, ready))
    proc.start()
    group = WeightGroup("127.0.0.1", port, 0, 2, "bench", backend, timeout_s=300, store=store)
    ready.wait(300)
    wire = device if backend == "nccl" else torch.device("cpu")

    def send():
        for bucket in iter_weight_buckets(trainer, args.bucket_mb):
            for _, tensor in bucket:
                group.broadcast(tensor.contiguous())
        group.broadcast(torch.zeros(1, device=wire))

    seconds = timed(send, device, repeats)
    proc.join(120)
    group.close()
    note = f"{backend}, {device} -> {receiver_device}" + ("" if two_gpus or device.type == "cpu" else " (1 GPU: through CPU)")
    return seconds, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--bucket-mb", type=float, default=512.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="shared,copy,checkpoint,broadcast,lora")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    modes = args.modes.split(",")
    trainer = build(args.shape, device, dtype, seed=0)
    engine = build(args.shape, device, dtype, seed=1)
    size = nbytes(trainer)
    rows: list[tuple[str, float, int, str]] = []
    cleanup: list[Path] = []

    if "shared" in modes:
        from posttrain.sync.shared import SharedSync

        class _Engine:  # the engine holds the trainer's own modules, as HFEngine does in-process
            model = trainer

            def update_weights(self, named_tensors=None):
                assert named_tensors is None

        shared = SharedSync(_Engine())
        moved = shared.push(1, 1)
        rows.append(("shared", timed(lambda: shared.push(1, 1), device, args.repeats), moved, "engine reads the trainer's tensors"))
    if "copy" in modes:
        named = {n: t for b in iter_weight_buckets(trainer, float("inf")) for n, t in b}
        rows.append(("copy (same device)", timed(lambda: load_named_tensors(engine, named), device, args.repeats), size,
                     "load_named_tensors, device to device"))
    if "checkpoint" in modes:
        from safetensors.torch import load_file

        folder = transfer_dir("", "bench", size)
        cleanup.append(folder)
        staging = StagingBuffer()  # what CheckpointSync keeps between syncs
        save_s = timed(lambda: save_weights(trainer, folder, staging=staging), device, args.repeats)
        load_s = timed(lambda: load_named_tensors(engine, load_file(os.path.join(folder, "model.safetensors"),
                                                                    device=str(device))), device, args.repeats)
        rows.append(("checkpoint", save_s + load_s, size, f"save {save_s:.3f}s + load to {device} {load_s:.3f}s in {folder.parent}"))
    if "broadcast" in modes:
        seconds, note = bench_broadcast(trainer, args, device, args.repeats)
        rows.append(("broadcast", seconds, size, f"{note}, {args.bucket_mb:g} MB buckets"))
    if "lora" in modes:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft probes deprecated transformers attributes
            policy = get_peft_model(build(args.shape, device, dtype, seed=0), config)
            served = get_peft_model(build(args.shape, device, dtype, seed=0), config)
        folder = transfer_dir("", "bench-lora")
        cleanup.append(folder)

        def push_adapter():
            from safetensors.torch import load_file as load

            policy.save_pretrained(str(folder))
            set_peft_model_state_dict(served, load(str(folder / "adapter_model.safetensors"), device=str(device)))

        rows.append(("lora (r=16, all-linear)", timed(push_adapter, device, args.repeats),
                     os.path.getsize(folder / "adapter_model.safetensors"), "save adapter + load into the served model"))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"weight sync, {args.shape} ({size / 1e6:.0f} MB {args.dtype}), {gpu}, median of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| mode | seconds | MB moved | GB/s | how |\n|---|---|---|---|---|")
    for name, seconds, moved, how in rows:
        rate = f"{moved / seconds / 1e9:.1f}" if moved and seconds > 0 else "-"
        print(f"| {name} | {seconds:.4f} | {moved / 1e6:.1f} | {rate} | {how} |")
    for folder in cleanup:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
