"""What every recipe sets up the same way, built once before its loop:

- ``build_optimization``: the optimizer, its LR schedule and the checkpoints of the run, restored
  from the checkpoint being resumed (``start_step`` and the saved trainer state);
- ``load_rl_prompt_data`` and ``encode_rl_prompts``: the prompts of a policy-gradient recipe,
  checked against its environments before any model loads, then tokenised;
- ``open_run_outputs``: where the run reports (metrics, rollout samples, the progress bar) and
  Ctrl-C / SIGTERM handling, entered on the recipe's ExitStack so they close in order.

The recipes keep what differs: their models, data, step and loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.checkpoint.manager import CheckpointManager
from posttrain.checkpoint.sharded import ShardedCheckpointManager, is_sharded_checkpoint
from posttrain.config.loader import config_to_dict
from posttrain.data.chat import TokenizedPrompt, encode_prompts
from posttrain.data.example import PromptExample
from posttrain.data.prompts import load_prompt_data
from posttrain.distributed import is_distributed, is_main_process
from posttrain.envs.registry import check_task_data
from posttrain.errors import PosttrainError
from posttrain.logging.metrics import MetricsLogger
from posttrain.logging.progress import ProgressBar
from posttrain.logging.samples import SampleLog
from posttrain.models.lora import checkpoint_prefix
from posttrain.trainer.interrupt import InterruptGuard
from posttrain.trainer.optim import build_optimizer, build_scheduler, follow_schedule

logger = logging.getLogger("posttrain.trainer")


@dataclass
class Optimization:
    """The optimizer side of a run, and where it starts: step 0, or the resumed checkpoint's step
    with its trainer state (``resumed_state``: the recipe restores its data order from it)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoints: CheckpointManager | ShardedCheckpointManager
    start_step: int = 0
    resumed_state: dict | None = None

    def save(self, step: int, model: Any, tokenizer: Any, trainer_state: dict, *, save_optimizer: bool,
             progress: ProgressBar, extra_files: dict[str, Any] | None = None) -> Path:
        """Checkpoint ``step`` (optimizer and schedule too when ``save_optimizer``) and say where."""
        states = (self.optimizer, self.scheduler) if save_optimizer else (None, None)
        extra = {"extra_files": extra_files} if extra_files else {}  # only single-process checkpoints hold them
        with progress.phase("saving checkpoint", pause=True):
            path = self.checkpoints.save(step, model, tokenizer, trainer_state, *states, **extra)
        progress.write(f"saved checkpoint {path}")
        return path


def build_optimization(model: torch.nn.Module, trainer_cfg: Any, keep_last: int, output_dir: Path,
                       total_optimizer_steps: int, resume_ckpt: Path | None) -> Optimization:
    """AdamW and its schedule over ``total_optimizer_steps`` for ``model`` (already prepared for
    training: sharded, cast), checkpoints in ``output_dir`` (sharded ones on several ranks), and,
    when resuming, the optimizer and schedule restored from ``resume_ckpt``."""
    optimizer = build_optimizer(model, trainer_cfg)
    scheduler = build_scheduler(optimizer, trainer_cfg, total_optimizer_steps)
    manager = ShardedCheckpointManager if is_distributed() else CheckpointManager
    optimization = Optimization(optimizer, scheduler, manager(output_dir, keep_last, prefix=checkpoint_prefix(model)))
    if resume_ckpt is None:
        return optimization
    if is_sharded_checkpoint(resume_ckpt):
        state = ShardedCheckpointManager.load(resume_ckpt, model, optimizer, scheduler)
    elif is_distributed():
        raise PosttrainError(
            f"'{resume_ckpt}' is a single-process checkpoint; resume it with trainer.num_processes=1, or start "
            f"a new multi-process run from its weights (model.path={resume_ckpt})."
        )
    else:
        state = CheckpointManager.load_trainer_state(resume_ckpt, optimizer, scheduler)
    # A resumed run may ask for another learning rate: the schedule follows the configured one.
    follow_schedule(optimizer, scheduler, trainer_cfg.lr)
    optimization.start_step, optimization.resumed_state = state["step"], state
    logger.info("Resumed from %s at step %d", resume_ckpt, optimization.start_step)
    return optimization


@dataclass
class RunOutputs:
    """Where a run reports. ``metrics`` and ``samples`` are None on ranks other than 0 (and
    ``samples`` for recipes without rollouts); the progress bar is silent there."""

    metrics: MetricsLogger | None
    samples: SampleLog | None
    progress: ProgressBar
    guard: InterruptGuard


def open_run_outputs(stack: contextlib.ExitStack, output_dir: Path, cfg: Any, max_steps: int, start_step: int,
                     resumed: bool, *, rollout_samples: bool = False) -> RunOutputs:
    """Metrics logger (continuing the run's metrics.jsonl when ``resumed``), the rollout sample log,
    the progress bar and the interrupt guard, each closed by ``stack``."""
    main = is_main_process()  # rank 0 logs metrics and shows progress; the others stay quiet
    resume_step = start_step if resumed else None
    metrics = stack.enter_context(MetricsLogger(output_dir, cfg.logging, config_to_dict(cfg), resume_step=resume_step)) \
        if main else None
    samples = SampleLog(output_dir, cfg.logging, resume_step=resume_step) if rollout_samples and main else None
    if not main:
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    progress = ProgressBar(max_steps, initial=start_step, enabled=cfg.logging.progress_bar and main)
    stack.callback(progress.close)
    # Several ranks: Ctrl-C always waits for the step's end, so no rank leaves a collective half-way.
    guard = stack.enter_context(InterruptGuard(defer_always=is_distributed()))
    return RunOutputs(metrics, samples, progress, guard)


def load_rl_prompt_data(cfg: Any, env_classes: dict) -> tuple[list[PromptExample], list[PromptExample]]:
    """The run's training and validation prompts (validation cut to validation.max_prompts), each
    row checked to reach an environment that can score it (with env.tasks: its task's). Called
    before the model loads: a row without a reference answer fails here, not as zero rewards."""
    train_examples, val_examples = load_prompt_data(cfg.data, cfg.seed)
    if cfg.validation.max_prompts:
        val_examples = val_examples[: cfg.validation.max_prompts]
    check_task_data(env_classes, train_examples, "training prompts")
    check_task_data(env_classes, val_examples, "validation prompts")
    return train_examples, val_examples


def encode_rl_prompts(cfg: Any, tokenizer: Any, train_examples: list[PromptExample],
                      val_examples: list[PromptExample]) -> tuple[list[TokenizedPrompt], list[TokenizedPrompt]]:
    """Both prompt sets as token ids: chat template, system prompt and data.max_prompt_tokens."""
    encode = dict(tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template,
                  system_prompt=cfg.model.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens)
    return (encode_prompts(train_examples, **encode, what="training prompts"),
            encode_prompts(val_examples, **encode, what="validation prompts"))
