"""Policy-update throughput: the naive transformers path vs posttrain's, on RL-shaped batches.

Each shape is a randomly initialised Qwen2 (speed does not depend on weight values). Every variant
trains on the same steps: each step is a mini-batch of completions whose total lengths are drawn
uniformly from --min-len..--max-len (prompt 32-256 tokens of it), adding samples until the step
holds --tokens-per-step tokens, one optimizer step per step. Reported per variant:

- tokens/s: real (prompt + response) tokens per second; padding does not count.
- MFU: 6 x parameters x real tokens / time / peak (--peak-tflops; 989 = H100 SXM bf16 dense).
  Attention FLOPs are not counted, and the LM head is counted for every token as in the usual
  6ND although posttrain computes logits only where a response token is predicted.
- peak GiB: torch.cuda.max_memory_allocated over the variant (weights, grads, AdamW states included).

Variants (``--variants``, comma-separated):
- ``naive``: what a plain transformers loop does: --naive-rows padded rows per micro-batch (16 x
  1024 = 16k slots), the model's full (rows, len, vocab) logits, float32 log_softmax, gather, a
  PPO-style token-mean loss; float32 weights under bf16 autocast, fused AdamW.
- ``posttrain``: ``posttrain.trainer.policy.policy_update`` with the defaults and
  trainer.micro_batch_tokens=--micro-batch-tokens (packed rows, chunked logprobs, fused AdamW).
  ``posttrain`` alone is the default attention, sdpa_varlen (flash varlen for packed rows on a GPU).
  Suffixes add options: ``+sdpa`` (model.attn_implementation=sdpa: dense masked rows),
  ``+flex`` (model.attn_implementation=flex_attention), ``+sdpaflex``
  (sdpa_flex: flex for the packed training rows, sdpa for the rest; the same kernels here), ``+eager``,
  ``+compile`` (trainer.compile_layers=true: torch.compile of each decoder layer), ``+bf16``
  (trainer.param_dtype=bfloat16), ``+bf16master`` (bf16 parameters with float32 masters in AdamW:
  trainer.param_dtype=bfloat16 trainer.master_weights=true), ``+ckpt`` (activation checkpointing), ``+compileloss``
  (trainer.compile_loss=true), ``+padded`` (trainer.micro_batch_tokens=0, micro_batch_size=--naive-rows),
  ``+nochunk`` (model.chunked_logprobs=0), ``+bf16logits`` (model.float32_logits=false),
  ``+rowsN`` (trainer.packed_row_tokens=N: rows of at most N
  tokens; by default one row with sdpa_flex/flex, rows no longer than the longest completion with sdpa),
  ``+chunkN`` (model.chunked_logprobs=N: LM-head chunk of N tokens; 0 is the plain head),
  ``+torchchunks`` (the chunks' element-wise work compiled by torch.compile instead of the Triton
  kernels of posttrain/models/logit_kernels.py), ``+eagerchunks`` (that work eager, neither).
  ``--set KEY=VALUE`` adds any config override to all of them.

Every variant runs in its own try/except (an error is printed and the next one runs), the CUDA cache
is emptied between variants, and variants that would start after --time-budget seconds are skipped.

    python bench/train_throughput.py --device cuda                       # 0.5b and 1.5b, all variants
    python bench/train_throughput.py --device cuda --shapes 0.5b --variants naive,posttrain+sdpaflex+compile
    python bench/train_throughput.py --device cuda --shapes 0.5b \
        --variants posttrain+sdpaflex+chunk512,posttrain+sdpaflex+chunk2048,posttrain+sdpaflex+chunk8192
    python bench/train_throughput.py --shapes tiny --device cpu          # smoke test, < 1 minute
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import gc
import math
import re
import sys
import time
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.models import chunked_logprobs
from posttrain.models.loading import autocast_context
from posttrain.models.logprobs import make_token_batch
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.models.logprobs import response_logprobs
from posttrain.trainer.packing import packed_row_tokens, packs_samples
from posttrain.trainer.policy import policy_update
from posttrain.trainer.samples import Sample, chunks, collate

QWEN_COMMON = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False)
SHAPES = {
    "0.5b": dict(QWEN_COMMON, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864),
    "1.5b": dict(QWEN_COMMON, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960),
    # CPU smoke test: same code paths, small enough for a laptop.
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=4096),
}
# The tiny shape uses shorter sequences and budgets (unless given), so the CPU smoke test stays fast.
TINY_DEFAULTS = dict(min_len=20, max_len=200, micro_batch_tokens=1024, naive_rows=5)
SUFFIXES = {
    "flex": ["model.attn_implementation=flex_attention"],
    "sdpaflex": ["model.attn_implementation=sdpa_flex"],
    "eager": ["model.attn_implementation=eager"],
    "bf16": ["trainer.param_dtype=bfloat16"],
    "bf16master": ["trainer.param_dtype=bfloat16", "trainer.master_weights=true"],
    "ckpt": ["model.gradient_checkpointing=true"],
    "compileloss": ["trainer.compile_loss=true"],
    "nochunk": ["model.chunked_logprobs=0"],
    "bf16logits": ["model.float32_logits=false"],
    "compile": ["trainer.compile_layers=true"],
    "sdpa": ["model.attn_implementation=sdpa"],
    "padded": [],  # handled in run_variant
    "eagerchunks": [],  # handled in run_variant
    "torchchunks": [],  # handled in run_variant
}


def make_steps(num_steps: int, tokens_per_step: int, min_len: int, max_len: int, vocab: int,
               seed: int) -> list[list[Sample]]:
    """Mini-batches of random completions, the same for every variant."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        samples, total = [], 0
        while total < tokens_per_step:
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            prompt_len = min(int(torch.randint(32, 257, (1,), generator=g)), length // 2)
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            n = length - prompt_len
            old = (-torch.rand(n, generator=g) * 3).tolist()
            ref = (-torch.rand(n, generator=g) * 3).tolist()
            samples.append(Sample(ids[:prompt_len], ids[prompt_len:], old, advantage=1.0 if len(samples) % 2 else -1.0,
                                  reward=0.0, ref_logprobs=ref))
            total += length
        steps.append(samples)
    return steps


def build_model(shape: str, device: torch.device, attn: str, gradient_checkpointing: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], pad_token_id=0, eos_token_id=2, bos_token_id=1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def naive_update(model, optimizer, samples: list[Sample], rows: int, device, autocast, max_grad_norm: float) -> None:
    """A plain transformers PPO-clip step: padded rows, full float32 log-softmax over the vocabulary."""
    num_loss_tokens = sum(len(s.response_ids) for s in samples)
    optimizer.zero_grad(set_to_none=True)
    for micro_batch in chunks(samples, rows):
        batch = make_token_batch([s.prompt_ids for s in micro_batch], [s.response_ids for s in micro_batch], 0, device)
        with autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
        logprobs = logits.float().log_softmax(-1)[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        B, L = batch.input_ids.shape
        positions = torch.arange(L - 1, device=device)
        starts = batch.prompt_lens[:, None] - 1
        lengths = torch.tensor([len(s.response_ids) for s in micro_batch], device=device)[:, None]
        mask = ((positions >= starts) & (positions < starts + lengths)).float()
        old = torch.zeros(B, L - 1, device=device)
        advantages = torch.zeros(B, L - 1, device=device)
        for i, s in enumerate(micro_batch):
            start = len(s.prompt_ids) - 1
            old[i, start: start + len(s.response_ids)] = torch.tensor(s.old_logprobs)
            advantages[i, start: start + len(s.response_ids)] = float(s.advantage)
        ratio = torch.exp(logprobs - old)
        per_token = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        ((per_token * mask).sum() / num_loss_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


@torch.no_grad()
def packed_vs_padded(model, samples: list[Sample], cfg: GRPOConfig, device, autocast) -> float:
    """Largest difference of response logprobs between the packed rows this variant trained on and
    one padded row per sample (bf16 noise is about 1e-1 at most; attending across samples is more)."""
    model.eval()
    layouts = [collate(samples, 0, device, packed=True,
                       row_tokens=packed_row_tokens(model, cfg.trainer.packed_row_tokens, samples)).tokens,
               collate(samples, 0, device).tokens]
    with autocast():
        packed, padded = (response_logprobs(model, tokens, chunk_size=cfg.model.chunked_logprobs)[0].float()
                          for tokens in layouts)
    model.train()
    return ((packed - padded).abs() * layouts[1].response_mask).max().item()


def profile_context(rows: int, device: torch.device):
    """torch.profiler over the timed steps when --profile is given (timings then include its overhead)."""
    if not rows:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def print_profile(profiler, device: torch.device, name: str, rows: int) -> None:
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# profile of {name} (timed steps, sorted by {sort})")
    print(profiler.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    if device.type == "cuda":
        print_gpu_gaps(profiler, rows)


# Phases of policy_update, labelled in profiles so that idle GPU time can be charged to one of them.
PHASES = {"collate": "collate", "response_logprobs": "forward", "clip_grad_norm": "clip_grad_norm",
          "split_micro_batches": "split_micro_batches", "aggregate_loss": "loss", "packs_samples": "packs_samples"}


@contextlib.contextmanager
def labelled_phases():
    """Wrap the phases of posttrain.trainer.policy in torch.profiler.record_function ranges."""
    from posttrain.trainer import policy

    def labelled(fn, label):
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"phase:{label}"):
                return fn(*args, **kwargs)
        return run

    originals = {name: getattr(policy, name) for name in PHASES}
    for name, label in PHASES.items():
        setattr(policy, name, labelled(originals[name], label))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(policy, name, fn)


def print_syncs(run_step, name: str) -> None:
    """Runs one step with CUDA sync debugging on and prints where the host waited for the GPU
    (each such wait idles the GPU until the host queues new work)."""
    import warnings

    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            place = f"{w.filename}:{w.lineno}"
            counts[place] = counts.get(place, 0) + 1
    print(f"# host-device syncs in one step of {name}: {sum(counts.values())}")
    for place, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {place}")


def print_host_profile(run_step, name: str, rows: int) -> None:
    """cProfile of one step: where the host's time goes (waits for the GPU show as the sync calls)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run_step)
    print(f"# host profile of one step of {name}: {time.perf_counter() - start:.3f} s wall (under cProfile)")
    stats = pstats.Stats(profiler).sort_stats("tottime")
    stats.print_stats(rows)
    stats.print_callers("'item'")  # host reads of tensors: a sync when the tensor is on the GPU


def print_gpu_gaps(profiler, rows: int) -> None:
    """Where the GPU sat idle: the kernel timeline's gaps, charged to the innermost labelled phase
    and CPU op (any thread, the autograd engine's included) running at each gap's middle, plus the
    device-synchronising runtime calls inside the gaps."""
    import json
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    profiler.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        print("# no GPU events in the trace")
        return
    busy, gaps, (start, end) = 0.0, [], gpu[0]
    for s, e in gpu[1:]:
        if s > end:
            busy += end - start
            gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = gpu[-1][1] - gpu[0][0]
    cpu = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")),
                 key=lambda e: e["ts"])
    runtime = sorted((e for e in events if e.get("cat") == "cuda_runtime"
                      and ("Synchronize" in e["name"] or e["name"] == "cudaMemcpy")), key=lambda e: e["ts"])
    # Sweep the gaps in time order, keeping the CPU events that have begun and not yet ended.
    by_place: dict[tuple[str, str], list[float]] = {}
    syncs: dict[str, float] = {}
    active: list[dict] = []
    next_event = 0
    for g0, g1 in gaps:
        mid = (g0 + g1) / 2
        while next_event < len(cpu) and cpu[next_event]["ts"] <= mid:
            active.append(cpu[next_event])
            next_event += 1
        active = [e for e in active if e["ts"] + e["dur"] >= mid]
        phases = [e for e in active if e["name"].startswith("phase:")]
        phase = min(phases, key=lambda e: e["dur"])["name"] if phases else "-"
        op = min(active, key=lambda e: e["dur"])["name"] if active else "-"
        key = ("(gaps under 20 us)", "") if g1 - g0 < 20 else (phase, op)
        by_place.setdefault(key, []).append(g1 - g0)
        for r in runtime[max(bisect.bisect_left(runtime, g0 - 1e6, key=lambda e: e["ts"]), 0):]:
            if r["ts"] >= g1:
                break
            if r["ts"] + r["dur"] > g0:
                syncs[r["name"]] = syncs.get(r["name"], 0.0) + min(g1, r["ts"] + r["dur"]) - max(g0, r["ts"])
    idle = span - busy
    print(f"# GPU timeline: span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), "
          f"idle {idle / 1e3:.1f} ms in {len(gaps)} gaps")
    print("| idle ms | gaps | largest ms | phase | CPU op at the gap's middle |")
    print("|---:|---:|---:|---|---|")
    for (phase, op), durations in sorted(by_place.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        print(f"| {sum(durations) / 1e3:.2f} | {len(durations)} | {max(durations) / 1e3:.2f} | {phase} | {op[:70]} |")
    for name, t in sorted(syncs.items(), key=lambda kv: -kv[1]):
        print(f"# inside gaps: {name} {t / 1e3:.2f} ms")


def run_variant(name: str, shape: str, steps: list[list[Sample]], args, device: torch.device) -> dict:
    base, *suffixes = name.split("+")
    unknown = [s for s in suffixes if s not in SUFFIXES and not re.fullmatch(r"(rows|chunk)\d+", s)]
    if base not in ("naive", "posttrain") or unknown or (base == "naive" and suffixes):
        raise ValueError(f"unknown variant {name!r}: naive, or posttrain with suffixes "
                         f"+{', +'.join(SUFFIXES)}, +rowsN, +chunkN")
    # Batch sizes are set per step below; these only have to pass the config checks.
    overrides = [f"trainer.micro_batch_tokens={args.micro_batch_tokens}", f"trainer.micro_batch_size={args.naive_rows}",
                 f"trainer.mini_batch_size={args.naive_rows}", f"rollout.batch_size={args.naive_rows}",
                 "rollout.group_size=1", "algorithm.advantage=reinforce_plus_plus",
                 f"rollout.max_new_tokens={args.max_len}"]
    for suffix in suffixes:
        if suffix in SUFFIXES:
            overrides += SUFFIXES[suffix]
        elif suffix.startswith("rows"):
            overrides.append(f"trainer.packed_row_tokens={suffix[4:]}")
        else:
            overrides.append(f"model.chunked_logprobs={suffix[5:]}")
    if "padded" in suffixes:
        overrides.append("trainer.micro_batch_tokens=0")
    cfg = load_config(GRPOConfig, None, overrides + list(args.set))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = autocast_context(device, dtype)
    model = build_model(shape, device, cfg.model.attn_implementation, cfg.model.gradient_checkpointing)
    prepare_for_training(model, cfg.trainer, device, dtype)  # trainer.param_dtype (FSDP only on several ranks)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, len(steps))
    num_params = sum(p.numel() for p in model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(samples: list[Sample]) -> None:
        if base == "naive":
            naive_update(model, optimizer, samples, args.naive_rows, device, autocast, cfg.trainer.max_grad_norm)
        else:
            cfg.rollout.batch_size = cfg.trainer.mini_batch_size = len(samples)  # one optimizer step per step
            policy_update(model, optimizer, scheduler, samples, 0, device, autocast,
                          algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                          moe_cfg=cfg.moe)

    compile_devices, kernel_devices = chunked_logprobs.COMPILE_DEVICE_TYPES, dict(chunked_logprobs._KERNELS_OK)
    if "eagerchunks" in suffixes:
        chunked_logprobs.COMPILE_DEVICE_TYPES = set()
    if "eagerchunks" in suffixes or "torchchunks" in suffixes:
        chunked_logprobs._KERNELS_OK.clear()
    try:
        for samples in steps[: args.warmup]:
            step(samples)
        sync()
        if args.find_syncs and device.type == "cuda":
            print_syncs(lambda: step(steps[args.warmup]), name)
        if args.host_profile:
            print_host_profile(lambda: (step(steps[args.warmup]), sync()), name, args.host_profile)
        profiler = profile_context(args.profile, device)
        start = time.perf_counter()
        with profiler, (labelled_phases() if args.profile else contextlib.nullcontext()):
            for samples in steps[args.warmup:]:
                step(samples)
            sync()
        elapsed = time.perf_counter() - start
        if args.profile:
            print_profile(profiler, device, name, args.profile)
    finally:
        chunked_logprobs.COMPILE_DEVICE_TYPES = compile_devices
        chunked_logprobs._KERNELS_OK.update(kernel_devices)
    tokens = sum(s.num_tokens for samples in steps[args.warmup:] for s in samples)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    # A model whose attention ignored the position-id restarts would have trained on padded rows.
    if base == "naive" or cfg.trainer.micro_batch_tokens == 0:
        layout = "padded"
    else:
        layout = "packed" if packs_samples(model, cfg.trainer.micro_batch_tokens, autocast) else "padded (fallback)"
        if layout == "packed":
            layout += f", logprobs within {packed_vs_padded(model, steps[0][:8], cfg, device, autocast):.0e} of padded"
    mfu = 6 * num_params * tokens / elapsed / (args.peak_tflops * 1e12)
    return dict(layout=layout, tokens_per_s=tokens / elapsed, mfu=mfu, peak_gib=peak, params=num_params,
                seconds=elapsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="0.5b,1.5b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--variants", default=None,
                        help="comma-separated (see the module docstring); default on cuda: naive, posttrain+sdpa, "
                        "posttrain, posttrain+compile, posttrain+compile+bf16, posttrain+sdpaflex+compile; on cpu: naive, "
                        "posttrain, posttrain+padded (flex has no CPU backward, compiling takes minutes)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (compilation, autotuning)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="posttrain's token budget (default 16384)")
    parser.add_argument("--naive-rows", type=int, default=None,
                        help="padded rows per naive micro-batch (default micro-batch-tokens / max-len = 16)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 4 x micro-batch-tokens")
    parser.add_argument("--min-len", type=int, default=None, help="shortest prompt + response (default 100)")
    parser.add_argument("--max-len", type=int, default=None, help="longest prompt + response (default 1024)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds; variants that would start later are skipped (a started one may take minutes)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="profile the timed steps and print the ROWS most expensive ops per variant")
    parser.add_argument("--host-profile", type=int, default=0, metavar="ROWS",
                        help="before timing, print the ROWS costliest functions of one step under cProfile")
    parser.add_argument("--find-syncs", action="store_true",
                        help="before timing, print where one step makes the host wait for the GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every posttrain variant, e.g. --set trainer.compile_loss=true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = ("naive,posttrain+sdpa,posttrain,posttrain+compile,posttrain+compile+bf16,"
                         "posttrain+sdpaflex+compile"
                         if device.type == "cuda"
                         else "naive,posttrain,posttrain+padded")
    began = time.perf_counter()
    print(f"# train_throughput {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print("# command: python " + " ".join(sys.argv))
    rows = []
    for shape in args.shapes.split(","):
        tiny = shape == "tiny"
        shape_args = argparse.Namespace(**vars(args))
        for key, default in dict(min_len=100, max_len=1024, micro_batch_tokens=16384).items():
            if getattr(args, key) is None:
                setattr(shape_args, key, TINY_DEFAULTS[key] if tiny else default)
        if args.naive_rows is None:
            shape_args.naive_rows = max(shape_args.micro_batch_tokens // shape_args.max_len, 1)
        tokens_per_step = args.tokens_per_step or 4 * shape_args.micro_batch_tokens
        steps = make_steps(args.warmup + args.steps, tokens_per_step, shape_args.min_len, shape_args.max_len,
                           SHAPES[shape]["vocab_size"], seed=1)
        print(f"# {shape}: {len(steps[0])} completions / {sum(s.num_tokens for s in steps[0])} tokens per step, "
              f"lengths {shape_args.min_len}-{shape_args.max_len}, posttrain budget {shape_args.micro_batch_tokens} "
              f"tokens per micro-batch, naive {shape_args.naive_rows} padded rows")
        for variant in args.variants.split(","):
            if time.perf_counter() - began > args.time_budget:
                rows.append((shape, variant, "skipped: time budget"))
                continue
            try:
                result = run_variant(variant, shape, steps, shape_args, device)
                rows.append((shape, variant, result))
                print(f"  {shape} {variant}: {result['tokens_per_s']:.0f} tok/s, MFU {100 * result['mfu']:.1f}%, "
                      f"peak {result['peak_gib']:.1f} GiB, {result['seconds']:.1f} s timed", flush=True)
            except Exception as e:  # report and go on: one failing option must not lose the other rows
                traceback.print_exc(limit=3)
                message = str(e).splitlines()[0][:120] if str(e) else ""
                rows.append((shape, variant, f"error: {type(e).__name__}: {message}"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print("| shape | variant | tokens/s | MFU | peak GiB | rows |")
    print("|---|---|---:|---:|---:|---|")
    for shape, variant, result in rows:
        if isinstance(result, str):
            print(f"| {shape} | {variant} | {result} | | | |")
        else:
            peak = "-" if math.isnan(result["peak_gib"]) else f"{result['peak_gib']:.1f}"
            mfu = f"{100 * result['mfu']:.1f}%" if device.type == "cuda" else "-"
            print(f"| {shape} | {variant} | {result['tokens_per_s']:,.0f} | {mfu} | {peak} | {result['layout']} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
