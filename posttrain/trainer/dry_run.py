"""``posttrain {grpo,ppo,sft,dpo} --dry-run``: what a run would cost, before it costs anything.

Prints the key settings, the parameter counts (from the model built on the ``meta`` device: no
weights, instant), an estimate of the training memory and of the engine's KV cache, the tokens of
one step, and a step time extrapolated from a short measurement on the target device: the real
model (loaded by the trainers' own builders) runs one forward+backward over a few hundred tokens
of the run's data, and the rollout engine generates a few tokens for one step's prompts. Then
warns about settings that will be slow or will not fit. Nothing is written: no run folder, no
reward workers, no optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace
from typing import Any, Callable

import torch

from posttrain.config import derived
from posttrain.config.schema import LoRAConfig
from posttrain.models.chunked_logprobs import AUTO_CHUNK, CPU_CHUNK, auto_chunk_size
from posttrain.models.loading import (
    autocast_context,
    load_model_and_tokenizer,
    load_tokenizer,
    model_source,
    resolve_compute_dtype,
    resolve_device,
)
from posttrain.models.moe import check_moe_config, gpus_per_node, resolve_ep_mode
from posttrain.rollout.builder import engine_max_model_len
from posttrain.trainer.builder import CPU_SLOW_GENERATED_TOKENS, build_policy
from posttrain.trainer.dry_run_plan import ModelShape, StepPlan, dpo_plan, meta_model_shape, rl_plan, sft_plan
from posttrain.trainer.dry_run_timing import REPEATS, device_memory, machine_load, time_forward_backward, time_generation

GiB = 2**30
CPU_SLOW_STEP_S = 120.0  # a step slower than this on a CPU gets a warning
CPU_SLOW_VALIDATION_S = 30.0  # and so does a validation slower than this (it runs several times)


def dry_run(command: str, cfg: Any, write: Callable[[str], None] = print) -> int:
    """Print the report for ``cfg`` of ``command`` (grpo, ppo, sft, dpo); returns the exit code (0)."""
    rl = command in ("grpo", "ppo")
    device = resolve_device(cfg.model.device)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, device)
    param_dtype = getattr(torch, getattr(cfg.trainer, "param_dtype", "float32"))
    generates = rl and cfg.rollout.backend != "openai" and cfg.rollout.source != "api"  # in this process
    # The run's own moe.* checks, before anything is printed: a dry run that passes, runs.
    if rl:
        check_moe_config(cfg, device)
    warnings: list[str] = []
    write(f"posttrain {command} --dry-run: estimates only; nothing is trained, started or written.")
    _section(write, "settings", _settings(command, cfg, device, compute_dtype, param_dtype))

    # ---- parameters, from the models built on the meta device
    policy = meta_model_shape(cfg.model, moe=cfg.moe if rl else None)
    critic = None
    if command == "ppo":  # the trainer's critic: the base model of critic.path or model.path, never LoRA
        critic = meta_model_shape(dataclasses.replace(cfg.model, path=cfg.critic.path or cfg.model.path, lora=LoRAConfig(),
                                                      gguf_file="" if cfg.critic.path else cfg.model.gguf_file), critic=True)
    reference_copy = rl and derived.needs_reference_copy(cfg)
    _section(write, "parameters", _parameter_lines(command, cfg, policy, critic))

    # ---- the step's shape, from a sample of the data (which also checks the data as the trainer would)
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model)
    plan = {"grpo": rl_plan, "ppo": rl_plan, "sft": sft_plan, "dpo": dpo_plan}[command](cfg, tokenizer)

    # ---- memory: training, then generation (the engine's KV cache is freed while the trainer runs)
    p_bytes, a_bytes = param_dtype.itemsize, compute_dtype.itemsize
    # trainer.master_weights: float32 masters, gradients (accumulated on the masters) and moments.
    masters = getattr(cfg.trainer, "master_weights", False) and p_bytes < 4
    s_bytes = 4 if masters else p_bytes
    parts = {"weights": policy.total * p_bytes, "gradients": policy.trainable * s_bytes,
             "AdamW moments": 2 * policy.trainable * s_bytes}
    if masters:
        parts["float32 masters"] = policy.trainable * 4
    if reference_copy:
        parts["reference"] = policy.total * p_bytes
    if rl and engine_weight_copies(cfg, device, param_dtype, compute_dtype):
        parts["engine copies"] = policy.total * a_bytes  # kept for the whole run (docs/engine.md)
    if critic is not None:
        parts["critic"] = 4 * critic.total * p_bytes  # weights, gradients, two moments
    checkpointing = cfg.model.gradient_checkpointing
    parts["activations"] = plan.micro_batch_tokens * policy.activation_values_per_token(checkpointing) * a_bytes
    capacity, capacity_name = device_memory(device)
    chunk = cfg.model.chunked_logprobs if rl else 0  # sft/dpo compute their micro-batch's logits at once
    if chunk == AUTO_CHUNK:  # as the trainer sizes it at its start, when nearly all of the GPU is free
        chunk = auto_chunk_size(policy.vocab, 4, capacity, capacity) if device.type == "cuda" else CPU_CHUNK
    parts["logits"] = (min(chunk, plan.micro_batch_tokens) if chunk else plan.micro_batch_tokens) * policy.vocab * 4 * 2
    lines = [f"{name:<14}{_gib(size)}" for name, size in parts.items()]
    lines.append(f"  (activations: {plan.micro_batch_tokens:,} tokens per micro-batch x {policy.layers} layers, hidden "
                 f"{policy.hidden}, MLP {policy.intermediate}; " + ("model.gradient_checkpointing=true)" if checkpointing else
                 f"{_gib(plan.micro_batch_tokens * policy.activation_values_per_token(True) * a_bytes)} with "
                 "model.gradient_checkpointing=true)"))
    lines.append(f"{'training':<14}{_gib(sum(parts.values()))} of {_gib(capacity)} ({capacity_name})")
    processes = getattr(cfg.trainer, "num_processes", 1)
    if processes > 1:
        lines.append(f"  (trainer.num_processes={processes}: FSDP holds about 1/{processes} of the weights, gradients and "
                     "AdamW moments per GPU; activations and the KV cache are per GPU)")
    stored = (f"parameters in {_name(param_dtype)}, float32 masters, gradients and AdamW states" if masters
              else f"parameters and AdamW states in {_name(param_dtype)}")
    _section(write, f"memory (estimate, one process; {stored}, activations in {_name(compute_dtype)})", lines)
    if sum(parts.values()) > capacity:
        warnings.append(f"the training estimate ({_gib(sum(parts.values()))}) exceeds {capacity_name} ({_gib(capacity)}): "
                        "lower trainer.micro_batch_tokens, set model.gradient_checkpointing=true or model.lora.r=16"
                        + (", or trainer.num_processes=N (FSDP)" if rl else ""))
    if generates:
        lines, kv_bytes = _kv_cache_lines(cfg, policy, plan, device, compute_dtype, param_dtype)
        _section(write, "KV cache", lines)
        generating = parts["weights"] + parts.get("reference", 0) + parts.get("critic", 0) / 4 + kv_bytes
        if generating > capacity:
            warnings.append(f"weights plus one step's KV cache ({_gib(generating)}) exceed {capacity_name} "
                            f"({_gib(capacity)}): generation will run in waves; lower rollout.batch_size or "
                            "data.max_prompt_tokens + rollout.max_new_tokens")
    _section(write, "tokens per step (means of a sample of the data; responses at their maximum length)", _token_lines(plan))

    # ---- measure on the device with the trainers' own builders, unless the weights cannot even load
    weights = parts["weights"] + parts.get("reference", 0) + parts.get("critic", 0) / 4
    if weights > capacity:
        _section(write, f"measured on {device}", [f"nothing: the weights alone ({_gib(weights)}) exceed {capacity_name}, "
                                                 "so no step time is estimated"])
        _write_warnings(write, warnings)
        return 0
    if rl:  # the trainers' own builder: MoE preparation and memory knobs as the run will have them
        policy_models = build_policy(cfg, device, compute_dtype, None, memory_knobs=command == "grpo",
                                     with_reference=False)
        model, tokenizer = policy_models.model, policy_models.tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    load, cores = machine_load()  # before measuring: the dry run's own work is not in it yet
    lines = []
    generation = None
    slowdowns: list[float] = []
    if generates:
        first_t, decode_t, sequences = time_generation(cfg, model, tokenizer, compute_dtype, plan.prompts)
        generation = (first_t.seconds, decode_t.seconds, sequences)
        slowdowns += [first_t.slowdown, decode_t.slowdown]
        lines.append(f"generation    {sequences} sequences: {_duration(first_t.seconds)} to the first token (prefill), "
                     f"{_duration(decode_t.seconds)} per decode step")
    elif rl:
        lines.append("generation    not measured: a remote server or the rollout API generates")
    fb_t, fwd_t, rows, row_len = time_forward_backward(model, tokenizer, device, autocast_context(device, compute_dtype), plan)
    fb, fwd = fb_t.seconds, fwd_t.seconds
    slowdowns += [fb_t.slowdown, fwd_t.slowdown]
    del model
    lines.append(f"train pass    {rows} row{'s' * (rows > 1)} of {row_len} tokens: {fb * 1e3:.3g} ms per token forward+backward, "
                 f"{fwd * 1e3:.3g} ms per token forward only")
    slowdown = max(slowdowns)
    lines.append(f"how           each time is the fastest of {REPEATS} repeats (the slowest took {slowdown:.1f}x longer)")
    busy = device.type == "cpu" and load > 0.75 * cores
    if busy:
        lines.append(f"busy machine  load average {load:.1f} on {cores} cores before measuring: other work shared the "
                     "cores, so these times (and the run's) depend on how busy the machine stays; the repeats "
                     f"differed up to {slowdown:.1f}x. On a quiet machine steps are faster")
    threads = f" ({torch.get_num_threads()} torch threads)" if device.type == "cpu" else ""
    _section(write, f"measured on {device}{threads}", lines)

    # ---- extrapolate
    times: dict[str, float] = {}
    if generation is not None:
        first, decode, sequences = generation
        # A CPU scales with the sequences; a GPU with the engine's waves of max_num_seqs.
        scale = (plan.completions / sequences if device.type == "cpu" else
                 math.ceil(plan.completions / cfg.rollout.engine.max_num_seqs) if cfg.rollout.backend == "engine" else 1)
        times["generation"] = scale * (first + (plan.max_new_tokens - 1) * decode)
    if plan.forward_tokens:
        times["logprob passes"] = plan.forward_tokens * fwd
    times["update"] = plan.trained_tokens * fb
    if critic is not None:  # the critic's passes cost about its share of the policy's parameters
        times["critic"] = plan.critic_tokens * fb * critic.total / policy.total
    step_time = sum(times.values())
    validation_time = 0.0
    if plan.validation_generated and generation is not None:
        # CPU decoding is compute-bound, so its time grows with the batch; a GPU decodes a batch at about one cost.
        batches = plan.validation_generated / sequences
        validation_time = (batches if device.type == "cpu" else max(1.0, batches)) * (
            first + (plan.validation_max_tokens - 1) * decode)
    elif plan.validation_forward_tokens:
        validation_time = plan.validation_forward_tokens * fwd
    lines = [", ".join(f"{k} {_duration(v)}" for k, v in times.items()) + ("; reward scoring not included" if rl else ""),
             "how: per-token times x the step's tokens (attention's growth with length ignored)"
             + ("; generation = first token + (max_new_tokens - 1) decode steps, as if every response ran to its limit"
                if rl else "")]
    if plan.once_forward_tokens:
        lines.append(f"before step 1 ~{_duration(plan.once_forward_tokens * fwd)} (reference logprobs of every pair)")
    if plan.validation:
        lines.append(f"validation    ~{_duration(validation_time)} each, {plan.num_validations} times ({plan.validation})")
    if plan.steps:
        total = plan.steps * step_time + plan.num_validations * validation_time + plan.once_forward_tokens * fwd
        lines.append(f"whole run     ~{_duration(total)} for {plan.steps:,} steps and the validations")
    if busy and slowdown > 1.25:
        lines.append(f"busy machine  ~{_duration(step_time * slowdown)} per step at the slowest repeat's pace; "
                     "measure again when the machine is quiet for a steadier estimate")
    _section(write, f"estimated step time: ~{_duration(step_time)} (an extrapolation of the measurements above, "
                    "not a promise)", lines)

    _write_warnings(write, warnings + _speed_warnings(command, cfg, plan, device, step_time, validation_time))
    return 0


def _write_warnings(write: Callable[[str], None], warnings: list[str]) -> None:
    write("")
    write("warnings" if warnings else "no warnings")
    for warning in warnings:
        write(f"  warning: {warning}")


def _section(write: Callable[[str], None], title: str, lines: list[str]) -> None:
    write("")
    write(title)
    for line in lines:
        write("  " + line)


def _parameter_lines(command: str, cfg: Any, policy: ModelShape, critic: ModelShape | None) -> list[str]:
    lora = cfg.model.lora.r
    lines = [f"policy        {policy.total:,} ({policy.trainable:,} trainable"
             + (f", LoRA r={lora}: {100 * policy.trainable / policy.total:.2f}%)" if lora else ")")]
    if command in ("grpo", "ppo"):
        lines.append("reference     " + ("none (algorithm.kl_coef=0)" if cfg.algorithm.kl_coef == 0 else
                                         "the policy with its adapters disabled (no copy)" if lora else
                                         f"{policy.total:,} (a frozen copy of the policy)"))
    if command == "dpo":
        lines.append("reference     the starting policy, run once over every pair before training (no copy)")
    if critic is not None:
        lines.append(f"critic        {critic.total:,} (all trainable)")
    return lines


def engine_weight_copies(cfg: Any, device: torch.device, param_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether posttrain's engine will keep 16-bit copies of the policy's float32 weights
    (rollout.engine.weight_copies: on a GPU, float32 parameters generating in 16 bits)."""
    r = cfg.rollout
    return (r.backend == "engine" and r.engine.weight_copies and device.type == "cuda"
            and param_dtype == torch.float32 and compute_dtype != torch.float32)


def _kv_cache_lines(cfg: Any, policy: ModelShape, plan: StepPlan, device: torch.device, compute_dtype: torch.dtype,
                    param_dtype: torch.dtype) -> tuple[list[str], float]:
    """The KV cache's lines and one step's KV bytes with this data's prompt lengths. The dtype is the
    engine's (model_runner.py): the compute dtype on a GPU, the weights' dtype during generation on a CPU."""
    r, e = cfg.rollout, cfg.rollout.engine
    if device.type == "cuda":
        dtype = compute_dtype
    else:
        dtype = torch.bfloat16 if torch.bfloat16 in (param_dtype, getattr(torch, e.cpu_dtype)) else param_dtype
    per_token = policy.kv_bytes_per_token * dtype.itemsize
    in_flight = r.batch_size * (cfg.data.max_prompt_tokens + r.max_new_tokens)
    typical = r.batch_size * plan.sequence_tokens * per_token
    lines = [
        f"per token     {per_token:,} bytes = 2 x {policy.layers} layers x {policy.kv_heads} KV heads x "
        f"{policy.head_dim} head dim x {dtype.itemsize} bytes ({_name(dtype)})",
        f"one step      {_gib(in_flight * per_token)}: at most {in_flight:,} tokens in flight = {r.batch_size} completions "
        f"x ({cfg.data.max_prompt_tokens} prompt + {r.max_new_tokens} new); {_gib(typical)} with this data's mean "
        f"prompt of {plan.sequence_tokens - r.max_new_tokens:.0f} tokens (a group also shares its prompt's blocks)",
    ]
    if r.backend == "engine":
        model_stub = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=policy.max_positions))
        max_len = engine_max_model_len(cfg, model_stub)
        full = e.max_num_seqs * math.ceil(max_len / e.block_size) * e.block_size * per_token
        budget = (f"{_gib(min(full, e.cpu_kv_cache_gb * GiB))}: rollout.engine.cpu_kv_cache_gb={e.cpu_kv_cache_gb:g} GiB"
                  if device.type == "cpu" else
                  f"rollout.engine.kv_cache_memory_fraction={e.kv_cache_memory_fraction:g} of the memory free at wake-up")
        lines.append(f"engine        reserves {budget}, capped at max_num_seqs={e.max_num_seqs} x {max_len} tokens "
                     f"({_gib(full)}); freed while the trainer runs")
    return lines, typical


def _token_lines(plan: StepPlan) -> list[str]:
    lines = []
    if plan.completions:
        lines.append(f"generated     at most {plan.completions * plan.max_new_tokens:,} ({plan.completions} completions "
                     f"x {plan.max_new_tokens})")
    lines.append(f"trained       {plan.trained_tokens:,.0f} (forward+backward through the policy)")
    if plan.forward_tokens:
        lines.append(f"forward only  {plan.forward_tokens:,.0f} ({plan.forward_what})")
    if plan.critic_tokens:
        lines.append(f"critic        {plan.critic_tokens:,.0f} (values, then its update)")
    if plan.once_forward_tokens:
        lines.append(f"once          {plan.once_forward_tokens:,.0f} (reference logprobs of every pair, before step 1)")
    return lines


def _speed_warnings(command: str, cfg: Any, plan: StepPlan, device: torch.device, step_time: float,
                    validation_time: float) -> list[str]:
    """Settings that make a run needlessly slow: thread oversubscription, CPU-sized batches and validations."""
    warnings = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() > cores:
        warnings.append(f"torch uses {torch.get_num_threads()} threads but {cores} CPU cores are available: threads "
                        f"contend and every step slows down; set OMP_NUM_THREADS={cores}")
    if device.type != "cpu":
        return warnings
    rl = command in ("grpo", "ppo")
    if rl and plan.completions * plan.max_new_tokens >= CPU_SLOW_GENERATED_TOKENS:
        warnings.append(f"on CPU each step generates {plan.completions} completions of up to {plan.max_new_tokens} "
                        "tokens; for a quick look use `--config cpu_quick` (or lower rollout.batch_size and "
                        "rollout.max_new_tokens)")
    elif step_time > CPU_SLOW_STEP_S:
        batch = {"sft": "trainer.batch_tokens", "dpo": "trainer.batch_size"}.get(command, "rollout.batch_size")
        warnings.append(f"a step takes about {_duration(step_time)} on this CPU; lower {batch} or use a GPU")
    if validation_time > CPU_SLOW_VALIDATION_S:
        key = "validation.max_prompts" if rl else "data.validation_size"
        warnings.append(f"one validation ({plan.validation}) takes about {_duration(validation_time)} on this CPU, "
                        f"{plan.num_validations} times in the run; lower {key} (e.g. {key}=16)")
    return warnings


def _settings(command: str, cfg: Any, device: torch.device, compute_dtype: torch.dtype, param_dtype: torch.dtype) -> list[str]:
    m, t = cfg.model, cfg.trainer
    lines = [
        f"model         {m.path}{' (' + m.gguf_file + ')' if m.gguf_file else ''}"
        + (" (the tokenizer; moe.random_init builds the weights)" if command == "grpo" and cfg.moe.random_init.family else "")
        + f" on {device}, compute "
        f"{_name(compute_dtype)}, parameters {_name(param_dtype)}"
        + (", activation checkpointing" if m.gradient_checkpointing else ""),
        "lora          " + (f"r={m.lora.r}, alpha={m.lora.alpha:g}, targets {list(m.lora.target_modules)}" if m.lora.r else "off"),
    ]
    if command in ("grpo", "ppo"):
        r, a, v = cfg.rollout, cfg.algorithm, cfg.validation
        lines += [
            f"rollout       {r.batch_size // r.group_size} prompts x {r.group_size} = {r.batch_size} completions per step, "
            f"up to {r.max_new_tokens} new tokens, backend {r.backend}" + (", source api" if r.source == "api" else ""),
            f"algorithm     advantage {a.advantage}, loss {a.policy_loss}, kl_coef {a.kl_coef:g}, ppo_epochs {a.ppo_epochs}",
            f"trainer       {t.max_steps} steps, mini-batch {t.mini_batch_size}, micro-batch "
            + (f"{t.micro_batch_tokens} tokens" if t.micro_batch_tokens else f"{t.micro_batch_size} completions")
            + f", lr {t.lr:g}, {t.num_processes} process(es)",
            f"validation    {v.max_prompts or 'all'} prompts, greedy, every {v.every} steps"
            + (", at start" if v.at_start else "") + (", at end" if v.at_end else ""),
        ]
        if command == "grpo" and _moe_asked(cfg.moe):
            lines.append(_moe_setting(cfg.moe, t.num_processes))
        if command == "ppo":
            c = cfg.critic
            lines.append(f"critic        {c.path or 'a copy of the policy'}, lr {c.lr:g}, warm-up {c.warmup_steps} steps")
    elif command == "sft":
        lines += [f"data          {cfg.data.train_path}, max_seq_len {cfg.data.max_seq_len}, "
                  f"{'packed' if cfg.data.packing else 'padded'} rows",
                  f"trainer       {t.batch_tokens} tokens per step, micro-batch {t.micro_batch_tokens} tokens, lr {t.lr:g}"]
    else:
        a = cfg.algorithm
        lines += [f"data          {cfg.data.train_path}, prompts <= {cfg.data.max_prompt_tokens}, responses <= "
                  f"{cfg.data.max_response_tokens} tokens",
                  f"algorithm     {a.loss_type}, beta {a.beta:g}",
                  f"trainer       {t.batch_size} pairs per step, micro-batch {t.micro_batch_size} pairs, lr {t.lr:g}"]
    lines.append(f"output        {t.output_dir or f'runs/{command}-<timestamp>'} (--dry-run creates nothing)")
    return lines


def _moe_asked(moe: Any) -> bool:
    return bool(moe.random_init.family) or moe.ep_mode != "single" or moe.expert_dtype != "auto"


def _moe_setting(moe: Any, processes: int) -> str:
    """The settings line of an MoE run: the experts, the expert parallelism moe.ep_mode gives on
    ``processes`` processes, and the rollouts' expert dtype."""
    r, init = moe.router, moe.random_init
    experts = (r.num_experts or 8) if init.family else None  # a loaded model's count is known once it loads
    model = f"random-init {init.family}, {experts} experts, top-{r.top_k or 2}" if init.family else "model.path's experts"
    if processes == 1 or moe.ep_mode == "single":
        ep = "every process holds all experts"
    elif experts is None:
        ep = f"the expert-parallel size follows from the model's expert count on {processes} processes"
    else:
        mode, size = resolve_ep_mode(moe.ep_mode, processes, gpus_per_node(processes), experts)
        ep = (f"{mode}, ep {size}: {experts // size} of {experts} experts per process" if size > 1 else
              "no expert-parallel size above 1 fits: every process holds all experts")
    return f"moe           {model}; ep_mode {moe.ep_mode}: {ep}; rollout expert dtype {moe.expert_dtype}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB" if num_bytes >= GiB / 100 else f"{num_bytes / 2**20:.2f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
