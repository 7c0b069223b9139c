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
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from posttrain.algorithms import resolved_off_policy_correction
from posttrain.config.schema import LoRAConfig, ModelConfig
from posttrain.data.chat import encode_prompts
from posttrain.data.packing import TokenBudgetBatcher
from posttrain.data.preference import load_preference_examples, tokenize_pairs
from posttrain.data.prompts import load_prompt_data
from posttrain.data.sampler import EpochSampler
from posttrain.data.sft import load_sft_conversations, tokenize_conversations
from posttrain.envs.registry import check_task_data, env_specs, resolve_env_classes
from posttrain.models.loading import (
    autocast_context,
    load_model_and_tokenizer,
    load_tokenizer,
    model_source,
    resolve_compute_dtype,
    resolve_device,
)
from posttrain.models.lora import apply_lora
from posttrain.models.value_model import ValueModel
from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.sampling import SamplingParams
from posttrain.trainer.memory import prepare_for_training

GiB = 2**30
# Generation work per GRPO/PPO step above which a CPU step takes minutes (the trainers warn at the same size).
CPU_SLOW_GENERATED_TOKENS = 8192
CPU_SLOW_STEP_S = 120.0  # a step slower than this on a CPU gets a warning
CPU_SLOW_VALIDATION_S = 30.0  # and so does a validation slower than this (it runs several times)
PROMPT_SAMPLE = 256  # rows tokenized to measure the data's lengths
MEASURED_TOKENS = {"cpu": 256, "cuda": 2048}  # tokens of the timed forward+backward
# Sequences of the timed generation on a CPU, where time grows about linearly with them (compute-bound),
# so a few stand for the whole batch; a GPU times the engine's whole first wave, which costs about one step.
CPU_MEASURED_SEQUENCES = 32
DECODE_STEPS = 8  # timed decode steps of generation
REPEATS = 2  # each timing is the fastest of this many runs, after a warm-up (other processes add noise)


@dataclass
class ModelShape:
    """What the estimates need from a model: parameter counts and the transformer's sizes."""

    total: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token in a cache of 1-byte elements (multiply by the dtype's size)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def activation_values_per_token(self, checkpointing: bool) -> int:
        """Values kept for the backward pass per token: about 8 x hidden + 4 x kv + 4 x intermediate
        per layer (norm inputs and outputs, q/k/v, attention output, the MLP's gate/up/product);
        with activation checkpointing, each layer's input plus one layer recomputed at a time."""
        per_layer = 8 * self.hidden + 4 * self.kv_heads * self.head_dim + 4 * self.intermediate
        return self.layers * self.hidden + per_layer if checkpointing else self.layers * per_layer


def meta_model_shape(model_cfg: ModelConfig, critic: bool = False) -> ModelShape:
    """Build the model on the ``meta`` device from its config (no weights are read) and measure it.
    ``critic``: the PPO value model instead (the transformer without its LM head, plus a value head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_source(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    if critic:
        model = ValueModel(model.base_model)
    elif model_cfg.lora.r > 0:
        model = apply_lora(model, model_cfg.lora)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", 0) or 0,
    )


@dataclass
class StepPlan:
    """One step's work in tokens, for the estimates. Lengths are means over a sample of the data."""

    sequence_tokens: float  # one training sequence (prompt + response)
    trained_tokens: float  # forward+backward through the policy per step
    forward_tokens: float  # forward-only policy/reference passes per step
    micro_batch_tokens: int
    forward_what: str = ""  # which passes those are
    completions: int = 0  # generated per step (grpo/ppo)
    max_new_tokens: int = 0
    critic_tokens: float = 0.0  # ppo: forward + forward+backward of the critic per step
    once_forward_tokens: float = 0.0  # dpo: the reference pass over every pair, once
    validation: str = ""  # what one validation does
    validation_forward_tokens: float = 0.0  # sft/dpo: forward tokens of one validation
    validation_generated: int = 0  # grpo/ppo: greedy completions of one validation
    validation_max_tokens: int = 0
    num_validations: int = 0
    steps: int = 0
    sequences: list = dataclasses.field(default_factory=list)  # token ids of the data, for the timed pass
    prompts: list = dataclasses.field(default_factory=list)  # grpo/ppo: prompt token ids, for the timed generation


def dry_run(command: str, cfg: Any, write: Callable[[str], None] = print) -> int:
    """Print the report for ``cfg`` of ``command`` (grpo, ppo, sft, dpo); returns the exit code (0)."""
    rl = command in ("grpo", "ppo")
    device = resolve_device(cfg.model.device)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, device)
    param_dtype = getattr(torch, getattr(cfg.trainer, "param_dtype", "float32"))
    generates = rl and cfg.rollout.backend != "openai" and cfg.rollout.source != "api"  # in this process
    warnings: list[str] = []
    write(f"posttrain {command} --dry-run: estimates only; nothing is trained, started or written.")
    _section(write, "settings", _settings(command, cfg, device, compute_dtype, param_dtype))

    # ---- parameters, from the models built on the meta device
    policy = meta_model_shape(cfg.model)
    critic = None
    if command == "ppo":  # the trainer's critic: the base model of critic.path or model.path, never LoRA
        critic = meta_model_shape(dataclasses.replace(cfg.model, path=cfg.critic.path or cfg.model.path, lora=LoRAConfig(),
                                                      gguf_file="" if cfg.critic.path else cfg.model.gguf_file), critic=True)
    reference_copy = rl and cfg.algorithm.kl_coef > 0 and cfg.model.lora.r == 0
    _section(write, "parameters", _parameter_lines(command, cfg, policy, critic))

    # ---- the step's shape, from a sample of the data (which also checks the data as the trainer would)
    tokenizer = load_tokenizer(model_source(cfg.model), cfg.model)
    plan = {"grpo": _rl_plan, "ppo": _rl_plan, "sft": _sft_plan, "dpo": _dpo_plan}[command](cfg, tokenizer)

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
    if critic is not None:
        parts["critic"] = 4 * critic.total * p_bytes  # weights, gradients, two moments
    checkpointing = cfg.model.gradient_checkpointing
    parts["activations"] = plan.micro_batch_tokens * policy.activation_values_per_token(checkpointing) * a_bytes
    chunk = cfg.model.chunked_logprobs if rl else 0  # sft/dpo compute their micro-batch's logits at once
    parts["logits"] = (min(chunk, plan.micro_batch_tokens) if chunk else plan.micro_batch_tokens) * policy.vocab * 4 * 2
    capacity, capacity_name = _device_memory(device)
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
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    if rl:
        model = prepare_for_training(model, cfg.trainer, device, compute_dtype)
    lines = []
    generation = None
    if generates:
        generation = _time_generation(cfg, model, tokenizer, compute_dtype, plan.prompts)
        lines.append(f"generation    {generation[2]} sequences: {_duration(generation[0])} to the first token (prefill), "
                     f"{_duration(generation[1])} per decode step")
    elif rl:
        lines.append("generation    not measured: a remote server or the rollout API generates")
    fb, fwd, rows, row_len = _time_forward_backward(model, tokenizer, device, autocast_context(device, compute_dtype), plan)
    del model
    lines.append(f"train pass    {rows} row{'s' * (rows > 1)} of {row_len} tokens: {fb * 1e3:.3g} ms per token forward+backward, "
                 f"{fwd * 1e3:.3g} ms per token forward only")
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
        f"model         {m.path}{' (' + m.gguf_file + ')' if m.gguf_file else ''} on {device}, compute "
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


def _rl_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    r, a, t, v = cfg.rollout, cfg.algorithm, cfg.trainer, cfg.validation
    # The trainers' first checks: an environment that does not import, or rows it cannot score, fail here too.
    env_classes = resolve_env_classes(env_specs(cfg.env.cls, cfg.env.kwargs, cfg.env.tasks))
    train, val = load_prompt_data(cfg.data, cfg.seed)
    check_task_data(env_classes, train, "training prompts")
    check_task_data(env_classes, val, "validation prompts")
    encode = dict(use_chat_template=cfg.model.use_chat_template, system_prompt=cfg.model.system_prompt,
                  max_prompt_tokens=cfg.data.max_prompt_tokens)
    prompts = encode_prompts(train[:PROMPT_SAMPLE], tokenizer, **encode, what="training prompts")
    seq = sum(len(p.token_ids) for p in prompts) / len(prompts) + r.max_new_tokens
    per_step = r.batch_size * seq
    # Old logprobs are recomputed unless the engine's match the trainer's (the hf backend scores with it).
    recompute = resolved_off_policy_correction(a).name != "none" or (r.recompute_logprobs and r.backend != "hf")
    passes = ["reference logprobs"] * (a.kl_coef > 0) + ["old logprobs recomputed"] * recompute
    num_val = min(len(val), v.max_prompts) if v.max_prompts else len(val)
    # As the recipes do: before step 1, every `every` steps but the last, after the last.
    validations = v.at_start + (t.max_steps - 1) // v.every * (v.every > 0) + v.at_end if num_val else 0
    val_tokens = v.max_new_tokens or r.max_new_tokens
    return StepPlan(
        sequence_tokens=seq, trained_tokens=per_step * a.ppo_epochs,
        forward_tokens=per_step * len(passes), forward_what=", ".join(passes),
        micro_batch_tokens=t.micro_batch_tokens or int(t.micro_batch_size * (cfg.data.max_prompt_tokens + r.max_new_tokens)),
        completions=r.batch_size, max_new_tokens=r.max_new_tokens,
        critic_tokens=per_step * (1 + a.ppo_epochs) if hasattr(cfg, "critic") else 0.0,
        validation=f"{num_val} greedy prompts x up to {val_tokens} tokens" if validations else "",
        validation_generated=num_val, validation_max_tokens=val_tokens, num_validations=validations, steps=t.max_steps,
        sequences=[p.token_ids for p in prompts], prompts=[p.token_ids for p in prompts],
    )


def _sft_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    t = cfg.trainer
    train, val = load_sft_conversations(cfg.data, cfg.seed)
    examples = tokenize_conversations(train[:PROMPT_SAMPLE], tokenizer, cfg.model, cfg.data.max_seq_len)
    mean = sum(len(ex) for ex in examples) / max(len(examples), 1)
    steps = t.max_steps or _sft_steps(cfg, [len(ex) for ex in examples], len(train))
    evaluate = t.eval_every > 0 and bool(val)
    # A step repeats conversations only with trainer.steps_cross_epochs (else it ends with its epoch).
    data_tokens = len(train) * mean
    trained = t.batch_tokens if t.steps_cross_epochs else min(t.batch_tokens, data_tokens)
    return StepPlan(sequence_tokens=mean, trained_tokens=trained, forward_tokens=0.0,
                    micro_batch_tokens=t.micro_batch_tokens, steps=steps,
                    validation=f"loss on {len(val)} conversations" if evaluate else "",
                    num_validations=2 + (steps - 1) // t.eval_every if evaluate else 0,
                    validation_forward_tokens=len(val) * mean if evaluate else 0.0,
                    sequences=[ex.input_ids for ex in examples])


def _sft_steps(cfg: Any, lengths: list[int], num_rows: int) -> int:
    """The steps of trainer.num_epochs, as the SFT recipe counts them: exactly (its batcher) when
    every row was tokenized, else from the mean length of the rows that were."""
    t = cfg.trainer
    if len(lengths) == num_rows:
        return TokenBudgetBatcher(lengths, t.batch_tokens, cfg.seed, cfg.data.shuffle,
                                  epoch_bounded=not t.steps_cross_epochs).steps_for_epochs(t.num_epochs)
    epoch_tokens = num_rows * sum(lengths) / max(len(lengths), 1)
    if t.steps_cross_epochs:
        return max(1, math.ceil(epoch_tokens * t.num_epochs / t.batch_tokens))
    per_epoch = epoch_tokens / t.batch_tokens
    whole, fraction = divmod(t.num_epochs, 1)
    return max(1, int(whole) * math.ceil(per_epoch) + math.ceil(fraction * per_epoch))


def _dpo_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    d, t = cfg.data, cfg.trainer
    train, val = load_preference_examples(d, cfg.seed)
    pairs = tokenize_pairs(train[:PROMPT_SAMPLE], tokenizer, use_chat_template=cfg.model.use_chat_template,
                           system_prompt=cfg.model.system_prompt, max_prompt_tokens=d.max_prompt_tokens,
                           max_response_tokens=d.max_response_tokens, what="training pairs")
    # Chosen and rejected each go through the model with the prompt: two sequences per pair.
    sequences = [s for p in pairs for s in (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)]
    per_pair = sum(len(s) for s in sequences) / max(len(pairs), 1)
    # Steps and pairs per step as the DPO recipe's sampler hands them out.
    sampler = EpochSampler(len(train), t.batch_size, cfg.seed, d.shuffle, epoch_bounded=not t.steps_cross_epochs)
    steps = t.max_steps or sampler.steps_for_epochs(t.num_epochs)
    pairs_per_step = t.batch_size if t.steps_cross_epochs else min(t.batch_size, len(train))
    return StepPlan(sequence_tokens=per_pair / 2, trained_tokens=pairs_per_step * per_pair, forward_tokens=0.0,
                    micro_batch_tokens=int(t.micro_batch_size * per_pair), steps=steps,
                    once_forward_tokens=(len(train) + len(val)) * per_pair,
                    validation=f"loss and margins on {len(val)} pairs" if val else "",
                    num_validations=(1 + (steps - 1) // t.eval_every if t.eval_every else 1) if val else 0,
                    validation_forward_tokens=len(val) * per_pair, sequences=sequences)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_generation(cfg: Any, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype,
                     sample: list[list[int]]) -> tuple[float, float, int]:
    """(seconds to the first token, seconds per decode step, sequences) for one step's prompts in the
    run's own engine, generating 1 + DECODE_STEPS tokens (EOS ignored) after a warm-up. posttrain's
    engine is timed step by step (prefill steps, then the median decode step); the hf backend by
    the difference between a 1-token and a longer generation."""
    r = cfg.rollout
    device = next(model.parameters()).device
    sequences = min(r.batch_size, r.engine.max_num_seqs) if r.backend == "engine" else r.batch_size
    if device.type == "cpu":
        sequences = min(sequences, CPU_MEASURED_SEQUENCES)
    num_prompts = max(1, sequences // r.group_size)
    prompts = [sample[i % len(sample)] for i in range(num_prompts)]
    engine = build_engine(cfg, model, tokenizer, compute_dtype)

    def generate(max_tokens: int) -> float:
        params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_tokens=max_tokens, ignore_eos=True)
        _sync(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        _sync(device)
        return time.perf_counter() - start

    try:
        generate(2)  # warm-up: KV cache allocation; on a GPU CUDA graphs and compilation
        if hasattr(engine, "step"):  # posttrain's engine: generate() runs engine.step() until done
            step_times: list[float] = []
            step = engine.step

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
            first = sum(step_times[:-DECODE_STEPS])
            decode = sorted(step_times[-DECODE_STEPS:])[DECODE_STEPS // 2]
        else:
            first = min(generate(1) for _ in range(REPEATS))
            # The hf backend stops at EOS regardless of ignore_eos, so this is an upper bound per step.
            decode = max(min(generate(1 + DECODE_STEPS) for _ in range(REPEATS)) - first, 0.0) / DECODE_STEPS
    finally:
        engine.sleep()
        if hasattr(engine, "close"):
            engine.close()
    return first, decode, num_prompts * r.group_size


def _time_forward_backward(model: torch.nn.Module, tokenizer: Any, device: torch.device, autocast: Callable,
                           plan: StepPlan) -> tuple[float, float, int, int]:
    """(seconds per token forward+backward, seconds per token forward, rows, row length): the run's
    own token sequences, cut into rows of about one training sequence, through the policy."""
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
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            runs.append(time.perf_counter() - start)
        timings.append(min(runs) / ids.numel())
    model.zero_grad(set_to_none=True)
    return timings[0], timings[1], rows, row_len


def _device_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


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
