"""The parts of a policy-gradient run (GRPO, PPO), built once before the loop, in the order that
fails cheapest first:

1. the environments' classes (a typo in ``env.cls`` fails before anything loads), the device (under
   torchrun: the process group), the run folder (``start_run``: new, or the run being resumed);
2. the prompts, checked against the environments before the model loads;
3. the policy, its frozen reference (when ``algorithm.kl_coef > 0``) and the training knobs;
4. the tokenised prompts, the rollout engine (runs with engine replicas, async or on Ray, start
   them in the recipe instead),
   the prompt sampler, the optimizer with its schedule and checkpoints (restored when resuming).

``open_rl_outputs`` then enters what must be closed in order on the recipe's ExitStack: the reward
pool (local worker processes or Ray actors), metrics, samples, progress and Ctrl-C handling.

SFT and DPO share ``build_optimization`` and ``open_run_outputs`` from setup.py; their data and
models differ too much for more.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.checkpoint.sharded import is_sharded_checkpoint
from posttrain.cluster import build_reward_pool
from posttrain.config import derived
from posttrain.data.chat import TokenizedPrompt
from posttrain.data.sampler import EpochSampler
from posttrain.distributed import RankShardedSampler, get_world_size, init_process_group, is_distributed
from posttrain.distributed.layout import ParallelLayout
from posttrain.envs.registry import env_specs, resolve_env_classes
from posttrain.models import load_model_and_tokenizer, make_reference_model, resolve_compute_dtype, resolve_device
from posttrain.models.moe import check_moe_config, moe_checklist, prepare_moe_policy
from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.trainer.common import start_run
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.setup import (
    Optimization,
    RunOutputs,
    build_optimization,
    encode_rl_prompts,
    load_rl_prompt_data,
    open_run_outputs,
)

logger = logging.getLogger("posttrain.trainer")

# Generation work per GRPO/PPO step above which a CPU step takes minutes (a warning here and in --dry-run).
CPU_SLOW_GENERATED_TOKENS = 8192


@dataclass
class PolicyModels:
    """The trained policy, its tokenizer, and the frozen reference of the KL term: None without
    KL, and for a LoRA policy, whose reference is itself with the adapters disabled (no copy).
    ``moe_shape``: the MoE policy's shape (experts, top-k) for the layout checklist, else None."""

    model: torch.nn.Module
    tokenizer: Any
    reference: torch.nn.Module | None
    moe_shape: Any = None


def build_policy(cfg: Any, device: torch.device, compute_dtype: torch.dtype, resume_ckpt: Path | None, *,
                 memory_knobs: bool = True, with_reference: bool = True) -> PolicyModels:
    """The policy (from ``resume_ckpt`` when resuming; a sharded checkpoint is loaded later, into the
    sharded model, by ``build_optimization``) and the reference, which is always the starting model.

    The MoE preparation (``moe.*``: a random-init MoE policy, the router dtype) applies to every
    RL recipe. ``memory_knobs``: the trainer's memory knobs (``trainer.param_dtype``, compiled
    layers, FSDP, expert parallelism) on policy and reference; PPO does not apply them yet (its
    critic copies the policy's weights as loaded). ``with_reference=False``: no reference
    (``--dry-run`` times the policy alone)."""
    sharded_resume = resume_ckpt is not None and is_sharded_checkpoint(resume_ckpt)

    def load(source: str | None = None) -> tuple[torch.nn.Module, Any, Any]:
        model, tokenizer = load_model_and_tokenizer(cfg.model, device, source=source, moe=cfg.moe)
        return model, tokenizer, prepare_moe_policy(model, cfg)

    model, tokenizer, moe_shape = load(str(resume_ckpt) if resume_ckpt and not sharded_resume else None)
    reference = None
    if with_reference and derived.needs_reference_copy(cfg):
        # The reference is always the starting model, also when resuming from a later checkpoint.
        reference = make_reference_model(model if resume_ckpt is None or sharded_resume else load()[0])
        if memory_knobs:
            prepare_for_training(reference, cfg.trainer, device, compute_dtype, moe=cfg.moe)
    if memory_knobs:
        model = prepare_for_training(model, cfg.trainer, device, compute_dtype, moe=cfg.moe)  # before the optimizer sees it
    return PolicyModels(model, tokenizer, reference, moe_shape)


@dataclass
class RLRun:
    """Everything a GRPO or PPO run builds before its loop (see the module's docstring)."""

    device: torch.device
    compute_dtype: torch.dtype
    output_dir: Path
    resume_ckpt: Path | None
    policy: PolicyModels
    train_prompts: Sequence[TokenizedPrompt]
    val_prompts: Sequence[TokenizedPrompt]
    engine: Any  # None in runs with engine replicas (async, process, Ray): the recipe starts them instead
    sampler: EpochSampler | RankShardedSampler
    optimization: Optimization

    @property
    def start_step(self) -> int:
        return self.optimization.start_step

    @property
    def resumed(self) -> bool:
        return self.resume_ckpt is not None


def build_rl_run(cfg: Any, resume_from: str | None, command: str, *, memory_knobs: bool = True) -> RLRun:
    """Build a GRPO-style run's parts (``command``: 'grpo' or 'ppo'; ``memory_knobs`` as in
    ``build_policy``). Under torchrun every rank builds its share: a shard of every model (FSDP2)
    and of every mini-batch's prompt groups."""
    # Cheap checks first, so a bad environment fails before anything is loaded or written.
    env_classes = resolve_env_classes(env_specs(cfg.env.cls, cfg.env.kwargs, cfg.env.tasks))  # task -> class
    device = init_process_group(resolve_device(cfg.model.device), cfg.trainer.dist_timeout_s)
    check_moe_config(cfg, device)  # e.g. moe.expert_dtype=fp8 on a GPU without fp8
    output_dir, resume_ckpt = start_run(cfg, resume_from, command)

    # Data first: rows the environment cannot score (e.g. no reference answer) fail here, before
    # the model loads, not as all-zero rewards at step 1.
    train_examples, val_examples = load_rl_prompt_data(cfg, env_classes)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, device)
    if device.type == "cpu" and cfg.rollout.batch_size * cfg.rollout.max_new_tokens >= CPU_SLOW_GENERATED_TOKENS:
        logger.warning(
            "Training on CPU: each step generates %d completions of up to %d tokens and takes minutes. "
            "For a quick look use `--config cpu_quick`.", cfg.rollout.batch_size, cfg.rollout.max_new_tokens,
        )
    policy = build_policy(cfg, device, compute_dtype, resume_ckpt, memory_knobs=memory_knobs)
    if policy.moe_shape is not None:  # the layout and router checklist, before anything trains
        logger.info(moe_checklist(policy.moe_shape, cfg, ParallelLayout.from_world_size(get_world_size()),
                                  type(policy.model).__name__))
    train_prompts, val_prompts = encode_rl_prompts(cfg, policy.tokenizer, train_examples, val_examples)
    # An engine on the policy's own modules is built here, before the optimizer: on a GPU its KV
    # budget is taken from the memory left after the models, not after the optimizer's state.
    # Runs with engine replicas (async, or on Ray) start them in the recipe instead.
    engine = None if derived.uses_engine_replicas(cfg) else build_engine(
        cfg.rollout, policy.model, policy.tokenizer, compute_dtype,
        max_model_len=engine_max_model_len(cfg, policy.model), float32_logits=cfg.model.float32_logits,
        expert_dtype=cfg.moe.expert_dtype)
    group_size = cfg.rollout.group_size
    sampler = EpochSampler(len(train_prompts), cfg.rollout.batch_size // group_size, cfg.seed, cfg.data.shuffle)
    if is_distributed():  # each rank: its share of every mini-batch's prompt groups
        sampler = RankShardedSampler(sampler, prompts_per_mini_batch=cfg.trainer.mini_batch_size // group_size)
    optimization = build_optimization(policy.model, cfg.trainer, cfg.checkpoint.keep_last, output_dir,
                                      cfg.trainer.max_steps * derived.optimizer_steps_per_step(
                                          cfg.algorithm, cfg.rollout, cfg.trainer), resume_ckpt)
    if optimization.resumed_state is not None:
        sampler.load_state_dict(optimization.resumed_state["sampler"])
    return RLRun(device, compute_dtype, output_dir, resume_ckpt, policy, train_prompts, val_prompts, engine, sampler,
                 optimization)


def open_rl_outputs(stack: contextlib.ExitStack, cfg: Any, run: RLRun) -> tuple[Any, RunOutputs]:
    """The reward pool (``env.num_workers`` processes, or Ray actors with ``cluster.backend=ray``)
    and the run's outputs (``open_run_outputs``), entered on ``stack`` in the order they close."""
    rewards = stack.enter_context(build_reward_pool(cfg.env, cfg.cluster))
    outputs = open_run_outputs(stack, run.output_dir, cfg, cfg.trainer.max_steps, run.start_step,
                               resumed=run.resumed, rollout_samples=True)
    if run.engine is not None and hasattr(run.engine, "close"):
        stack.callback(run.engine.close)
    return rewards, outputs
