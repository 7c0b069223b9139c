"""Cross-field checks of ``posttrain grpo`` (and, through ``ppo.py``, of ``posttrain ppo``):
batch arithmetic, algorithm options, data mixes, the rollout backend and sync mode, the engine,
the rollout API, torchrun sizes and asynchronous rollouts."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from posttrain.config.schema import GRPOConfig
from posttrain.config.validate.cluster import async_problems
from posttrain.config.validate.common import lora_problems


def off_policy_problems(a: Any) -> list[str]:
    """Checks of ``algorithm.off_policy_*`` and its older form ``algorithm.is_correction_cap`` (the
    correction's name is checked against the registry with every other registered choice)."""
    problems = []
    if a.is_correction_cap > 0 and a.off_policy_correction not in ("none", "tis_token"):
        problems.append(f"algorithm.is_correction_cap={a.is_correction_cap} is token-level truncated IS, and "
                        f"algorithm.off_policy_correction={a.off_policy_correction} is another correction: set one. "
                        "algorithm.is_correction_cap=0 keeps the latter (algorithm.off_policy_correction=tis_token "
                        "with algorithm.off_policy_cap is the former).")
    if not a.off_policy_cap > 0:
        problems.append(f"algorithm.off_policy_cap={a.off_policy_cap} must be > 0 (the truncation of the importance "
                        "weight; 2.0 is common).")
    if not 0 < a.off_policy_low < 1 < a.off_policy_high:
        problems.append(f"algorithm.off_policy_low={a.off_policy_low} and algorithm.off_policy_high={a.off_policy_high} "
                        "must satisfy 0 < low < 1 < high: the range of ratios kept must contain 1, an on-policy "
                        "token (e.g. 0.5 and 2.0).")
    return problems


MIX_KEYS = ("path", "task", "weight", "prompt_column", "messages_column", "answer_column", "validation_path",
            "validation_size")


def data_mix_problems(data: Any, env: Any) -> list[str]:
    """Checks of ``data.mix``: a list of {path, task, weight, ...} sources for data.task=prompts."""
    if not data.mix:
        return []
    example = "data.mix=[{path: math.jsonl, task: math, weight: 3}, {path: weather.jsonl, task: weather, weight: 1}]"
    if data.task != "prompts":
        return [f"data.mix is only used with data.task=prompts (got data.task={data.task}); set data.task=prompts "
                "or data.mix=[]."]
    if not isinstance(data.mix, (list, tuple)):
        return [f"data.mix must be a list of sources, e.g. {example}."]
    problems: list[str] = []
    for i, source in enumerate(data.mix):
        key = f"data.mix[{i}]"
        if not isinstance(source, dict):
            problems.append(f"{key} must be a mapping {{path, task, weight}}, got {source!r}; e.g. {example}.")
            continue
        unknown = [str(k) for k in source if k not in MIX_KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], MIX_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key} has unknown keys {unknown}.{hint} Valid keys: {', '.join(MIX_KEYS)}.")
        path, task, weight = source.get("path"), source.get("task"), source.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            problems.append(f"{key}.path is required: a JSONL or Parquet file, a saved `datasets` folder, or hf:NAME.")
        elif not (path.startswith("hf:") or Path(path).expanduser().exists()):
            problems.append(f"{key}.path='{path}' does not exist (relative paths start at {Path.cwd()}).")
        vpath = source.get("validation_path")
        if vpath and not (str(vpath).startswith("hf:") or Path(str(vpath)).expanduser().exists()):
            problems.append(f"{key}.validation_path='{vpath}' does not exist (relative paths start at {Path.cwd()}).")
        if not isinstance(task, str) or not task.strip():
            problems.append(f"{key}.task is required: the task name its rows are tagged with (a key of env.tasks).")
        elif env.tasks and task not in env.tasks:
            close = difflib.get_close_matches(task, [str(t) for t in env.tasks], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}.task='{task}' is not one of env.tasks ({', '.join(map(str, env.tasks))}).{hint}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            problems.append(f"{key}.weight={weight!r} must be a number > 0 (a relative share of the training prompts).")
        size = source.get("validation_size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            problems.append(f"{key}.validation_size={size!r} must be an integer >= 0.")
    return problems


def _near_multiples(n: int, k: int) -> str:
    low = n // k * k
    return f"{low} or {low + k}" if low > 0 else str(k)


def _near_divisors(n: int, k: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max(d for d in divisors if d <= k) if k >= 1 else 1
    above = [d for d in divisors if d > k]
    return f"{below} or {above[0]}" if above else str(below)


def grpo_problems(cfg: GRPOConfig) -> list[str]:
    """Cross-field checks of a GRPO run; one message per problem, each naming its keys."""
    r, t, a, d, e = cfg.rollout, cfg.trainer, cfg.algorithm, cfg.data, cfg.env
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, value in [("trainer.max_steps", t.max_steps), ("rollout.batch_size", r.batch_size),
                       ("trainer.mini_batch_size", t.mini_batch_size),
                       ("trainer.micro_batch_size", t.micro_batch_size),
                       ("rollout.generation_batch_size", r.generation_batch_size),
                       ("rollout.max_new_tokens", r.max_new_tokens), ("algorithm.ppo_epochs", a.ppo_epochs),
                       ("data.max_prompt_tokens", d.max_prompt_tokens), ("rollout.group_size", r.group_size)]:
        need(value >= 1, f"{key}={value} must be a positive integer (>= 1).")
    need(a.advantage not in ("grpo", "rloo", "reinforce_plus_plus_baseline") or r.group_size != 1,
         f"rollout.group_size=1 must be >= 2 for algorithm.advantage={a.advantage}: advantages are rewards minus "
         "a baseline from the rest of the group, so a group of one completion always has advantage 0 and "
         "nothing is learned (algorithm.advantage=reinforce_plus_plus needs no group).")
    need(r.max_turns >= 1, f"rollout.max_turns={r.max_turns} must be >= 1 (1: single-turn episodes).")
    need(r.max_turns <= 1 or cfg.model.use_chat_template,
         f"rollout.max_turns={r.max_turns} needs model.use_chat_template=true: the tokens of each observation "
         "are cut from the chat template's rendering of the conversation.")
    need(r.max_turns <= 1 or type(cfg) is GRPOConfig,
         f"rollout.max_turns={r.max_turns}: multi-turn episodes are supported by the grpo command only; "
         "set rollout.max_turns=1.")
    need(a.dual_clip_c == 0 or a.dual_clip_c > 1,
         f"algorithm.dual_clip_c={a.dual_clip_c} must be 0 (off) or > 1: it caps the loss of negative-advantage "
         "tokens at the value of ratio dual_clip_c; e.g. algorithm.dual_clip_c=3.")
    need(a.dual_clip_c == 0 or a.policy_loss == "ppo_clip",
         f"algorithm.dual_clip_c={a.dual_clip_c} only applies to algorithm.policy_loss=ppo_clip "
         f"(got {a.policy_loss}); set algorithm.dual_clip_c=0.")
    need(0 <= a.gspo_clip_low < 1 and a.gspo_clip_high >= 0,
         f"algorithm.gspo_clip_low={a.gspo_clip_low} must be in [0, 1) and algorithm.gspo_clip_high="
         f"{a.gspo_clip_high} >= 0 (the paper uses 3e-4 and 4e-4).")
    need(0 <= a.overlong_buffer < r.max_new_tokens or a.overlong_buffer == 0,
         f"algorithm.overlong_buffer={a.overlong_buffer} must be >= 0 and < rollout.max_new_tokens="
         f"{r.max_new_tokens} (the penalty ramps up over the last overlong_buffer tokens before the limit; "
         "DAPO: a quarter of the limit).")
    need(a.overlong_penalty >= 0, f"algorithm.overlong_penalty={a.overlong_penalty} must be >= 0.")
    need(a.is_correction_cap >= 0, f"algorithm.is_correction_cap={a.is_correction_cap} must be >= 0 (0 turns it off; 2.0 is common).")
    problems += off_policy_problems(a)
    need(a.max_sampling_rounds >= 1,
         f"algorithm.max_sampling_rounds={a.max_sampling_rounds} must be >= 1 (rounds of generation per step).")
    need(not a.dynamic_sampling or r.group_size >= 2,
         "algorithm.dynamic_sampling=true needs rollout.group_size >= 2: it keeps groups whose rewards differ, "
         "and a group of one completion never does.")
    if r.batch_size >= 1 and r.group_size >= 1:
        need(r.batch_size % r.group_size == 0,
             f"rollout.batch_size={r.batch_size} must be a multiple of rollout.group_size={r.group_size} "
             f"(every prompt gets a full group); e.g. rollout.batch_size={_near_multiples(r.batch_size, r.group_size)}.")
    if r.batch_size >= 1 and t.mini_batch_size >= 1:
        need(r.batch_size % t.mini_batch_size == 0,
             f"trainer.mini_batch_size={t.mini_batch_size} must divide rollout.batch_size={r.batch_size} "
             f"(optimizer steps take equal shares of the rollout); e.g. trainer.mini_batch_size="
             f"{_near_divisors(r.batch_size, t.mini_batch_size)}.")
    # trainer.micro_batch_size sizes micro-batches only without a token budget (and PPO's critic
    # without critic.micro_batch_size, checked there): not validated where it is not used.
    if t.mini_batch_size >= 1 and t.micro_batch_size >= 1 and t.micro_batch_tokens == 0:
        need(t.mini_batch_size % t.micro_batch_size == 0,
             f"trainer.micro_batch_size={t.micro_batch_size} must divide trainer.mini_batch_size="
             f"{t.mini_batch_size} (gradients accumulate over whole micro-batches); e.g. "
             f"trainer.micro_batch_size={_near_divisors(t.mini_batch_size, t.micro_batch_size)}.")
    need(t.micro_batch_tokens >= 0, f"trainer.micro_batch_tokens={t.micro_batch_tokens} must be >= 0 (0: "
         "trainer.micro_batch_size padded rows; e.g. trainer.micro_batch_tokens=4096).")
    need(t.packed_row_tokens >= 0, f"trainer.packed_row_tokens={t.packed_row_tokens} must be >= 0 (0: one row "
         "per micro-batch; e.g. trainer.packed_row_tokens=2048).")
    need(r.temperature > 0, f"rollout.temperature={r.temperature} must be > 0: GRPO learns from differences "
         "between sampled completions, and 0 (greedy) makes a group's completions identical; try 1.0. "
         "(Validation is greedy regardless.)")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]; 1.0 turns nucleus sampling off.")
    need(t.lr > 0, f"trainer.lr={t.lr} must be > 0, e.g. trainer.lr=1e-6.")
    need(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1] (a fraction of trainer.lr).")
    need(e.timeout_s > 0, f"env.timeout_s={e.timeout_s} must be > 0 seconds.")
    need(1 <= d.arithmetic.difficulty <= 5,
         f"data.arithmetic.difficulty={d.arithmetic.difficulty} must be between 1 and 5.")
    for key, value in [("rollout.top_k", r.top_k), ("algorithm.clip_ratio_low", a.clip_ratio_low),
                       ("algorithm.clip_ratio_high", a.clip_ratio_high), ("algorithm.kl_coef", a.kl_coef),
                       ("trainer.warmup_steps", t.warmup_steps), ("trainer.weight_decay", t.weight_decay),
                       ("trainer.max_grad_norm", t.max_grad_norm), ("env.num_workers", e.num_workers),
                       ("checkpoint.every", cfg.checkpoint.every), ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("validation.every", cfg.validation.every), ("validation.max_prompts", cfg.validation.max_prompts),
                       ("validation.max_new_tokens", cfg.validation.max_new_tokens),
                       ("data.validation_size", d.validation_size)]:
        need(value >= 0, f"{key}={value} must be >= 0.")
    problems += data_mix_problems(d, e)
    if d.task == "arithmetic":
        for key, value in [("data.train_path", d.train_path), ("data.validation_path", d.validation_path)]:
            need(not value, f"{key}='{value}' is set, but data.task=arithmetic generates its own problems and "
                 "would ignore it. Set data.task=prompts to train on your file (or data.task=gsm8k for GSM8K "
                 f"files), or drop {key}.")
    if d.task in ("gsm8k", "prompts"):
        need(bool(d.train_path) or bool(d.mix and d.task == "prompts"), f"data.train_path is required for data.task={d.task}: set it to "
             + ("the GSM8K train JSONL file, e.g. data.train_path=gsm8k/train.jsonl." if d.task == "gsm8k"
                else "a JSONL or Parquet file, a saved `datasets` folder, or hf:NAME."))
        for key, path in [("data.train_path", d.train_path), ("data.validation_path", d.validation_path)]:
            need(not path or path.startswith("hf:") or Path(path).expanduser().exists(),
                 f"{key}='{path}' does not exist (relative paths start at {Path.cwd()}); fix the path "
                 "or use hf:NAME for a hub dataset.")
    problems += lora_problems(cfg.model.lora)
    problems += rollout_backend_problems(cfg)
    problems += rollout_source_problems(cfg)
    problems += engine_problems(cfg)
    problems += distributed_problems(cfg)
    problems += async_problems(cfg)
    return problems


def engine_problems(cfg: Any) -> list[str]:
    """rollout.engine: sizes that cannot work, each with the fix."""
    e = cfg.rollout.engine
    problems = []
    if e.block_size < 1 or e.block_size & (e.block_size - 1):
        problems.append(f"rollout.engine.block_size={e.block_size} must be a power of two (16 is usual).")
    if e.max_num_seqs < 1:
        problems.append(f"rollout.engine.max_num_seqs={e.max_num_seqs} must be >= 1 (256 is usual).")
    if e.max_num_batched_tokens < 1:
        problems.append(f"rollout.engine.max_num_batched_tokens={e.max_num_batched_tokens} must be >= 1 (16384 is usual).")
    if not 0 < e.kv_cache_memory_fraction <= 1:
        problems.append(f"rollout.engine.kv_cache_memory_fraction={e.kv_cache_memory_fraction} must be in (0, 1]: "
                        "the share of free GPU memory for the KV cache (0.5 is the default).")
    if e.cpu_kv_cache_gb <= 0:
        problems.append(f"rollout.engine.cpu_kv_cache_gb={e.cpu_kv_cache_gb} must be > 0 GiB.")
    if e.max_model_len < 0:
        problems.append(f"rollout.engine.max_model_len={e.max_model_len} must be >= 0 (0: derived from the length limits).")
    return problems


def rollout_source_problems(cfg: Any) -> list[str]:
    """rollout.source=api: groups come from the rollout API (docs/rollout_api.md)."""
    r = cfg.rollout
    if r.source != "api":
        return []
    problems = []
    if not r.api_url.startswith(("http://", "https://")):
        problems.append(f"rollout.source=api needs rollout.api_url, the rollout API's address (got '{r.api_url}'); "
                        "e.g. rollout.api_url=http://127.0.0.1:8100 after `posttrain rollout-api --port 8100`.")
    if type(cfg) is not GRPOConfig:
        problems.append("rollout.source=api is supported by the grpo command only; set rollout.source=generate.")
    if r.max_turns > 1:
        problems.append(f"rollout.source=api with rollout.max_turns={r.max_turns}: environments run their own "
                        "episodes and submit token masks; set rollout.max_turns=1.")
    if r.api_timeout_s <= 0:
        problems.append(f"rollout.api_timeout_s={r.api_timeout_s} must be > 0 seconds.")
    if getattr(cfg.trainer, "num_processes", 1) > 1:
        problems.append(f"rollout.source=api with trainer.num_processes={cfg.trainer.num_processes}: one trainer "
                        "process pulls the batches; set trainer.num_processes=1.")
    return problems


def rollout_backend_problems(cfg: Any) -> list[str]:
    """Checks of rollout.backend and the sync section together: which sync modes fit which engine."""
    r, s = cfg.rollout, cfg.sync
    lora = cfg.model.lora.r > 0
    # Replica processes and Ray actors are separate engines (async, or sync with those backends).
    ray_replicas = getattr(getattr(cfg, "cluster", None), "backend", "") in ("process", "ray")
    problems: list[str] = []
    if r.backend == "openai":
        if type(cfg) is not GRPOConfig:
            problems.append("rollout.backend=openai is supported by the grpo command only; set rollout.backend=engine or hf.")
        if not r.base_url.startswith(("http://", "https://")):
            problems.append(f"rollout.backend=openai needs rollout.base_url, the server's http(s) address, e.g. "
                            f"rollout.base_url=http://127.0.0.1:8000 (got '{r.base_url}').")
        if r.max_concurrency < 1:
            problems.append(f"rollout.max_concurrency={r.max_concurrency} must be >= 1.")
        if not r.request_timeout_s > 0:
            problems.append(f"rollout.request_timeout_s={r.request_timeout_s} must be > 0 seconds.")
        if lora and s.mode in ("broadcast", "checkpoint", "shared"):
            problems.append(f"sync.mode={s.mode} sends full weights, but with model.lora.r > 0 the trainer's weights "
                            "are a base model plus an adapter; use sync.mode=lora (or auto).")
    elif s.mode not in ("auto", "shared") and not ray_replicas:  # Ray replicas are separate engines
        problems.append(f"sync.mode={s.mode} moves weights to a separate engine, but rollout.backend={r.backend} "
                        "generates with the trainer's own modules; use sync.mode=shared (or auto), or "
                        "rollout.backend=openai with rollout.base_url.")
    if s.mode == "lora" and not lora:
        problems.append("sync.mode=lora moves the LoRA adapter only and needs model.lora.r > 0; use "
                        "sync.mode=checkpoint or broadcast for full weights.")
    if s.interval < 1:
        problems.append(f"sync.interval={s.interval} must be >= 1 (1: sync after every optimizer step).")
    for key, value in [("sync.max_staleness", s.max_staleness), ("sync.timeout_s", s.timeout_s)]:
        if value < 0:
            problems.append(f"{key}={value} must be >= 0 (0: off).")
    if not s.bucket_mb > 0:
        problems.append(f"sync.bucket_mb={s.bucket_mb} must be > 0 (e.g. 512).")
    if not s.collective_timeout_s > 0:
        problems.append(f"sync.collective_timeout_s={s.collective_timeout_s} must be > 0 seconds.")
    if not 0 <= s.master_port <= 65535:
        problems.append(f"sync.master_port={s.master_port} must be a TCP port (0: pick a free one).")
    return problems


def launch_world_size(cfg: Any) -> int:
    """Processes of this run: torchrun's WORLD_SIZE inside a torchrun worker, else trainer.num_processes."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.trainer.num_processes


def distributed_problems(cfg: Any) -> list[str]:
    """Checks of a multi-process (FSDP2) run: work must split evenly over the ranks, and the features
    that do not run sharded yet are named."""
    t, r = cfg.trainer, cfg.rollout
    if t.num_processes < 1:
        return [f"trainer.num_processes={t.num_processes} must be >= 1 (1: a single process)."]
    problems: list[str] = []
    if not t.dist_timeout_s > 0:
        problems.append(f"trainer.dist_timeout_s={t.dist_timeout_s} must be > 0 seconds.")
    world = launch_world_size(cfg)
    if world == 1:
        if t.fsdp_cpu_offload:
            problems.append("trainer.fsdp_cpu_offload=true offloads FSDP shards and needs trainer.num_processes > 1.")
        return problems
    where = f"{world} processes (trainer.num_processes or torchrun's --nproc-per-node)"
    if type(cfg) is not GRPOConfig:
        problems.append(f"{where}: only the grpo command runs on several processes so far; use trainer.num_processes=1.")
    groups = r.batch_size // max(r.group_size, 1)
    if groups % world:
        problems.append(f"{where}: the {groups} prompt groups per step (rollout.batch_size / rollout.group_size) "
                        f"must split evenly over the ranks; e.g. rollout.batch_size={_near_multiples(r.batch_size, r.group_size * world)}.")
    if t.mini_batch_size % (r.group_size * world):
        problems.append(f"{where}: trainer.mini_batch_size={t.mini_batch_size} must be a multiple of rollout.group_size "
                        f"x {world} (each rank holds whole prompt groups of every mini-batch); e.g. trainer.mini_batch_size="
                        f"{_near_multiples(t.mini_batch_size, r.group_size * world)}.")
    if cfg.algorithm.dynamic_sampling:
        problems.append(f"{where}: algorithm.dynamic_sampling=true is not supported on several processes yet "
                        "(ranks would keep different numbers of groups); set it to false or trainer.num_processes=1.")
    if t.master_weights:
        problems.append(f"{where}: trainer.master_weights=true is not supported with FSDP (sharded checkpoints map optimizer "
                        "state to the model's own parameters); use trainer.param_dtype=float32 trainer.master_weights=false, "
                        "which under FSDP already keeps float32 shards and runs bf16 all-gathers and compute.")
    if cfg.model.lora.r > 0:
        problems.append(f"{where}: LoRA (model.lora.r > 0) is not supported with FSDP yet; a LoRA run fits one "
                        "GPU: use trainer.num_processes=1.")
    if r.backend == "openai":  # (backend=engine generates with transformers on sharded models; see rollout/builder.py)
        problems.append(f"{where}: rollout.backend={r.backend} is not supported on several processes yet; use rollout.backend=hf.")
    if getattr(r, "source", "generate") != "generate":
        problems.append(f"{where}: rollout.source={r.source} is not supported on several processes yet; use rollout.source=generate.")
    return problems
