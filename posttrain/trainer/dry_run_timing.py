"""``--dry-run``'s short measurements on the target device: a few decode steps of the rollout
engine and one forward+backward of the real model, each the fastest of a few repeats.

Other work on the machine (a busy CPU above all) slows single timings by 2-5x, so two dry runs
of one command could differ 4x. The fastest repeat is what the run gets when it has the machine
to itself; the slowest repeat says how much other work slowed the measurement, and the report
gives both (``Timing.slowdown``) together with the machine's load before measuring."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.sampling import SamplingParams
from posttrain.trainer.dry_run_plan import StepPlan

MEASURED_TOKENS = {"cpu": 256, "cuda": 2048}  # tokens of the timed forward+backward
# Sequences of the timed generation on a CPU, where time grows about linearly with them (compute-bound),
# so a few stand for the whole batch; a GPU times the engine's whole first wave, which costs about one step.
CPU_MEASURED_SEQUENCES = 32
DECODE_STEPS = 8  # timed decode steps of generation
REPEATS = 3  # each timing is the fastest of this many runs, after a warm-up (other processes add noise)


@dataclass
class Timing:
    """A measured time (the fastest of REPEATS) and ``slowdown``: the slowest repeat over the fastest."""

    seconds: float
    slowdown: float = 1.0

    @classmethod
    def of(cls, runs: list[float]) -> "Timing":
        fastest = min(runs)
        return cls(fastest, max(runs) / fastest if fastest > 0 else 1.0)


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPU cores this process may use): above the cores, work waits for a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cores
    except OSError:
        return 0.0, cores


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(cfg: Any, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype,
                     sample: list[list[int]]) -> tuple[Timing, Timing, int]:
    """(time to the first token, time per decode step, sequences) for one step's prompts in the
    run's own engine, generating 1 + DECODE_STEPS tokens (EOS ignored) REPEATS times after a
    warm-up. posttrain's engine is timed step by step (prefill steps, then the median decode
    step); the hf backend by the difference between a 1-token and a longer generation."""
    r = cfg.rollout
    device = next(model.parameters()).device
    sequences = min(r.batch_size, r.engine.max_num_seqs) if r.backend == "engine" else r.batch_size
    if device.type == "cpu":
        sequences = min(sequences, CPU_MEASURED_SEQUENCES)
    num_prompts = max(1, sequences // r.group_size)
    prompts = [sample[i % len(sample)] for i in range(num_prompts)]
    engine = build_engine(r, model, tokenizer, compute_dtype, max_model_len=engine_max_model_len(cfg, model),
                          float32_logits=cfg.model.float32_logits, expert_dtype=cfg.moe.expert_dtype)

    def generate(max_tokens: int) -> float:
        params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_tokens=max_tokens, ignore_eos=True)
        synchronize(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        synchronize(device)
        return time.perf_counter() - start

    try:
        generate(2)  # warm-up: KV cache allocation; on a GPU CUDA graphs and compilation
        if hasattr(engine, "step"):  # posttrain's engine: generate() runs engine.step() until done
            firsts, decodes = [], []
            step = engine.step
            for _ in range(REPEATS):
                step_times: list[float] = []

                def timed_step():
                    start = time.perf_counter()
                    finished = step()
                    step_times.append(time.perf_counter() - start)  # a step ends with its tokens on the host
                    return finished

                engine.step = timed_step
                try:
                    generate(1 + DECODE_STEPS)
                finally:
                    del engine.step
                # The scheduler runs every prefill first; each later step decodes one token of every sequence.
                firsts.append(sum(step_times[:-DECODE_STEPS]))
                decodes.append(sorted(step_times[-DECODE_STEPS:])[DECODE_STEPS // 2])
            first, decode = Timing.of(firsts), Timing.of(decodes)
        else:
            first = Timing.of([generate(1) for _ in range(REPEATS)])
            # The hf backend stops at EOS regardless of ignore_eos, so this is an upper bound per step.
            longer = Timing.of([generate(1 + DECODE_STEPS) for _ in range(REPEATS)])
            decode = Timing(max(longer.seconds - first.seconds, 0.0) / DECODE_STEPS, longer.slowdown)
    finally:
        engine.sleep()
        if hasattr(engine, "close"):
            engine.close()
    return first, decode, num_prompts * r.group_size


def time_forward_backward(model: torch.nn.Module, tokenizer: Any, device: torch.device, autocast: Callable,
                           plan: StepPlan) -> tuple[Timing, Timing, int, int]:
    """(time per token forward+backward, time per token forward, rows, row length): the run's own
    token sequences, cut into rows of about one training sequence, through the policy."""
    budget = min(plan.micro_batch_tokens, MEASURED_TOKENS.get(device.type, 2048))
    row_len = max(2, min(int(plan.sequence_tokens), budget))
    rows = max(1, budget // row_len)
    stream = [tok for seq in plan.sequences for tok in seq] or list(range(len(tokenizer)))
    stream = (stream * math.ceil(rows * row_len / len(stream)))[: rows * row_len]
    ids = torch.tensor(stream, device=device).view(rows, row_len)

    def forward_backward() -> None:
        with autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()

    @torch.no_grad()
    def forward() -> None:
        with autocast():
            model(input_ids=ids, use_cache=False)

    model.train()
    timings = []
    for fn in (forward_backward, forward):
        fn()  # warm-up (and compilation, with trainer.compile_layers)
        runs = []
        for _ in range(REPEATS):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - start)
        timings.append(Timing.of([run / ids.numel() for run in runs]))
    model.zero_grad(set_to_none=True)
    return timings[0], timings[1], rows, row_len


def device_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
