"""The SFT recipe. ``train`` builds the parts once (``SFTRecipe.__init__``), then runs
``SFTRecipe.step`` per step: a token budget of conversations -> micro-batches -> accumulate
gradients -> clip, step -> metrics; then validation and checkpoints.

The loss of a step is the summed NLL of its answer tokens divided by the step's number of answer
tokens, every micro-batch normalised by that same total: the accumulated gradient is the
token-mean gradient of the whole step, whichever way the step is split into micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from posttrain.checkpoint.rng import seed_everything
from posttrain.config.sft_schema import SFTConfig
from posttrain.data.packing import (
    IGNORE_INDEX,
    MicroBatch,
    TokenBudgetBatcher,
    build_micro_batches,
    position_ids_isolate_documents,
)
from posttrain.data.sft import load_sft_conversations, tokenize_conversations
from posttrain.logging.metrics import format_console_line
from posttrain.models import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
from posttrain.models.loading import autocast_context
from posttrain.trainer.common import SkippedStepGuard, due, log_small_data, save_on_interrupt, start_run
from posttrain.trainer.optim import clip_and_step
from posttrain.trainer.setup import build_optimization, open_run_outputs

logger = logging.getLogger("posttrain.trainer")
Autocast = Callable[[], contextlib.AbstractContextManager]


def train(cfg: SFTConfig, resume_from: str | None = None) -> Path:
    """Run SFT; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    output_dir, resume_ckpt = start_run(cfg, resume_from, "sft")
    with contextlib.ExitStack() as stack:
        SFTRecipe(cfg, output_dir, resume_ckpt, stack).train()
    return output_dir


class SFTRecipe:
    """An SFT run: its parts, built once here, its ``step`` and its loop. Closed by the caller's ExitStack."""

    def __init__(self, cfg: SFTConfig, output_dir: Path, resume_ckpt: Path | None, stack: contextlib.ExitStack) -> None:
        self.cfg = cfg
        # Rows are read and checked before the model loads, so a bad file fails fast.
        train_convs, val_convs = load_sft_conversations(cfg.data, cfg.seed)
        self.device = resolve_device(cfg.model.device)
        self.autocast = autocast_context(self.device, resolve_compute_dtype(cfg.model.dtype, self.device))
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, self.device,
                                                              source=str(resume_ckpt) if resume_ckpt else None)
        self.train_examples = tokenize_conversations(train_convs, self.tokenizer, cfg.model, cfg.data.max_seq_len)
        self.val_examples = tokenize_conversations(val_convs, self.tokenizer, cfg.model, cfg.data.max_seq_len,
                                                   what="validation conversations")
        packed = cfg.data.packing and position_ids_isolate_documents(self.model, self.autocast)
        if cfg.data.packing and not packed:
            logger.warning("This model's attention ignores position-id document boundaries; packing falls back "
                           "to one padded conversation per row (set data.packing=false to silence this).")
        self.batching = dict(micro_batch_tokens=cfg.trainer.micro_batch_tokens, max_seq_len=cfg.data.max_seq_len,
                             packed=packed, pad_token_id=self.tokenizer.pad_token_id)
        self.val_batches = build_micro_batches(self.val_examples, **self.batching)
        self.batcher = TokenBudgetBatcher([len(ex) for ex in self.train_examples], cfg.trainer.batch_tokens, cfg.seed,
                                          cfg.data.shuffle, epoch_bounded=not cfg.trainer.steps_cross_epochs)
        self.max_steps = cfg.trainer.max_steps or self.batcher.steps_for_epochs(cfg.trainer.num_epochs)
        self._log_plan(packed)
        # Same option names as GRPO's trainer section: one optimizer builder for every recipe.
        self.optimization = build_optimization(self.model, cfg.trainer, cfg.checkpoint.keep_last, output_dir,
                                               self.max_steps, resume_ckpt)
        self.start_step = self.optimization.start_step
        if self.optimization.resumed_state is not None:
            self.batcher.load_state_dict(self.optimization.resumed_state["data"])

        outputs = open_run_outputs(stack, output_dir, cfg, self.max_steps, self.start_step,
                                   resumed=resume_ckpt is not None)
        self.metrics_log, self.progress, self.guard = outputs.metrics, outputs.progress, outputs.guard
        self.completed, self.data_state = self.start_step, self.batcher.state_dict()
        self.skipped_steps = SkippedStepGuard(cfg.trainer.max_skipped_steps)
        self.evaluate = cfg.trainer.eval_every > 0 and bool(self.val_batches)

    def _log_plan(self, packed: bool) -> None:
        """The data and steps of the run, and what is unusual about them."""
        cfg, batcher, max_steps, num_train = self.cfg, self.batcher, self.max_steps, len(self.train_examples)
        epochs = batcher.epochs_for_steps(max_steps)
        logger.info("%d training conversations (%d tokens), %d validation; %d steps of <= %d tokens (%.3g epochs); %s rows",
                    num_train, sum(batcher.lengths), len(self.val_examples), max_steps, cfg.trainer.batch_tokens,
                    epochs, "packed" if packed else "padded")
        log_small_data(num_train, sum(batcher.lengths), cfg.trainer.batch_tokens, "trainer.batch_tokens",
                       "conversations", "tokens", cfg.trainer.steps_cross_epochs)
        if cfg.trainer.max_steps and epochs > 1 + 1e-9:
            # trainer.max_steps wins over num_epochs; many passes over a small file overfit it.
            logger.warning("trainer.max_steps=%d spans %.3g epochs: one pass over the %d training conversations takes "
                           "about %d steps of trainer.batch_tokens=%d (metrics log data/epoch). Set trainer.max_steps=0 "
                           "to train trainer.num_epochs=%g epochs instead.", max_steps, epochs, num_train,
                           batcher.steps_for_epochs(1.0), cfg.trainer.batch_tokens, cfg.trainer.num_epochs)

    def train(self) -> None:
        cfg, start_step, max_steps, progress = self.cfg, self.start_step, self.max_steps, self.progress
        try:
            if self.evaluate and start_step == 0:
                self.validate(0)
            for step in range(start_step + 1, max_steps + 1):
                step_metrics = self.step(step)
                progress.update(step, {"loss": step_metrics["loss"]})
                if due(step, cfg.logging.console_every):
                    progress.write(format_console_line(step, max_steps, step_metrics))
                if self.evaluate and due(step, cfg.trainer.eval_every, max_steps):
                    self.validate(step)
                if due(step, cfg.checkpoint.every, max_steps):
                    self.save_checkpoint()
            if self.evaluate and self.completed > start_step:
                self.validate(self.completed)
            self.save_checkpoint()
        except KeyboardInterrupt:
            save_on_interrupt(self.completed, start_step, self.save_checkpoint, progress.write)
            raise

    def step(self, step: int) -> dict[str, float]:
        """One training step; returns its metrics."""
        step_start = time.perf_counter()
        seed_everything(self.cfg.seed * 1_000_003 + step)  # dropout etc. independent of the past: exact resume

        # ---- data: a token budget of whole conversations, packed into micro-batches
        documents = [self.train_examples[i] for i in self.batcher.next_step()]
        micro_batches = build_micro_batches(documents, **self.batching)

        # ---- update and its metrics line; Ctrl-C waits for both (whole steps in checkpoints)
        with self.guard.deferred():
            optimizer = self.optimization.optimizer
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler then moves on)
            update_metrics = sft_update(self.model, optimizer, self.optimization.scheduler, micro_batches,
                                        self.cfg.trainer.max_grad_norm, self.device, self.autocast)
            elapsed = time.perf_counter() - step_start
            real = sum(mb.num_real_tokens for mb in micro_batches)
            slots = sum(mb.num_slots for mb in micro_batches)
            step_metrics = {
                **update_metrics,
                "lr": lr,
                "perf/tokens_per_s": real / elapsed,
                "data/tokens": float(real),
                "data/conversations": float(len(documents)),
                "data/micro_batches": float(len(micro_batches)),
                "data/padding_fraction": 1.0 - real / slots,
                "data/epoch": self.batcher.epochs_done,
                "time/step": elapsed,
            }
            self.metrics_log.log(step, step_metrics)
            self.skipped_steps.record(step, not update_metrics["optim/skipped_updates"])
            self.completed, self.data_state = step, self.batcher.state_dict()
        return step_metrics

    def validate(self, step: int) -> None:
        with self.progress.phase("validating", pause=True):  # between steps: not in the ETA's step rate
            val_loss = validation_loss(self.model, self.val_batches, self.device, self.autocast)
        self.metrics_log.log(step, {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))})
        self.progress.write(f"validation at step {step}: loss={val_loss:.4g} ({len(self.val_examples)} conversations)")

    def save_checkpoint(self) -> None:
        self.optimization.save(self.completed, self.model, self.tokenizer,
                               {"data": self.data_state, "seed": self.cfg.seed, "max_steps": self.max_steps},
                               save_optimizer=self.cfg.checkpoint.save_optimizer, progress=self.progress)


def summed_nll(model: torch.nn.Module, batch: MicroBatch, autocast: Autocast) -> torch.Tensor:
    """Sum over the micro-batch of -log p(target) at every labelled position (a scalar).

    Only the positions that carry a label in some row get logits (``logits_to_keep`` as indices),
    so long prompts cost no (rows, len, vocab) logits tensor. ``use_cache=False`` is required:
    with a cache, transformers ignores the position-id document boundaries of packed rows."""
    keep = (batch.labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    with autocast():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # the log-softmax in float32, also under bf16 autocast
    return F.cross_entropy(logits.flatten(0, 1), batch.labels[:, keep].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def sft_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[MicroBatch],
    max_grad_norm: float,
    device: torch.device,
    autocast: Autocast,
) -> dict[str, float]:
    """One optimizer step over ``micro_batches``: token-mean NLL, gradients accumulated exactly."""
    num_loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    nll_total = 0.0
    for batch in micro_batches:
        nll = summed_nll(model, batch.to(device), autocast)
        (nll / num_loss_tokens).backward()  # the step's token count, not the micro-batch's
        nll_total += nll.item()
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(clip_and_step(optimizer, model.parameters(), max_norm))
    skipped = 0.0
    if not math.isfinite(grad_norm):
        skipped = 1.0
        logger.warning("non-finite gradient norm; optimizer step skipped")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": nll_total / num_loss_tokens, "grad_norm": grad_norm, "data/loss_tokens": float(num_loss_tokens),
            "optim/skipped_updates": skipped}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[MicroBatch], device: torch.device,
                    autocast: Autocast) -> float:
    """Token-averaged NLL of the validation answers (every answer token weighs the same)."""
    was_training = model.training
    model.eval()
    try:
        total = sum(summed_nll(model, batch.to(device), autocast).item() for batch in batches)
    finally:
        model.train(was_training)
    return total / max(sum(batch.num_loss_tokens for batch in batches), 1)
