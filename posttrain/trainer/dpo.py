"""The DPO recipe. ``train`` builds the parts once (``DPORecipe.__init__``: preference pairs ->
reference logprobs of every pair, once, with the starting weights -> the policy), then runs
``DPORecipe.step`` per step: a batch of pairs -> policy update (chosen and rejected of a pair in
one forward pass) -> metrics; then validation and checkpoints."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from posttrain.algorithms import dpo_loss, sequence_logps, uses_length_average
from posttrain.checkpoint.rng import seed_everything
from posttrain.config.dpo_schema import DPOAlgorithmConfig, DPOConfig, DPOTrainerConfig
from posttrain.data.preference import PreferencePair, load_preference_examples, tokenize_pairs
from posttrain.data.sampler import EpochSampler
from posttrain.logging.metrics import format_console_line
from posttrain.models import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
from posttrain.models.loading import autocast_context, load_tokenizer, model_source
from posttrain.models.lora import adapters_disabled, is_peft_model, lora_enabled
from posttrain.trainer.common import SkippedStepGuard, due, log_small_data, save_on_interrupt, start_run
from posttrain.trainer.dpo_reference import (
    REFERENCE_FILE,
    compute_reference_logps,
    load_cached_reference,
    pair_token_logps,
    reference_fingerprint,
    save_reference,
)
from posttrain.trainer.optim import clip_and_step
from posttrain.trainer.samples import chunks
from posttrain.trainer.setup import build_optimization, open_run_outputs

logger = logging.getLogger("posttrain.trainer")

Autocast = Callable[[], AbstractContextManager]


def train(cfg: DPOConfig, resume_from: str | None = None) -> Path:
    """Run DPO; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    output_dir, resume_ckpt = start_run(cfg, resume_from, "dpo")
    with contextlib.ExitStack() as stack:
        DPORecipe(cfg, output_dir, resume_ckpt, stack).train()
    return output_dir


class DPORecipe:
    """A DPO run: its parts, built once here, its ``step`` and its loop. Closed by the caller's ExitStack."""

    def __init__(self, cfg: DPOConfig, output_dir: Path, resume_ckpt: Path | None, stack: contextlib.ExitStack) -> None:
        self.cfg = cfg
        # ---- data first: a malformed row fails before any model is loaded.
        train_examples, val_examples = load_preference_examples(cfg.data, cfg.seed)
        self.device = resolve_device(cfg.model.device)
        compute_dtype = resolve_compute_dtype(cfg.model.dtype, self.device)
        self.autocast = autocast_context(self.device, compute_dtype)
        self.tokenizer = load_tokenizer(str(resume_ckpt) if resume_ckpt else model_source(cfg.model), cfg.model)
        self.pad_token_id = self.tokenizer.pad_token_id
        tokenize = dict(
            tokenizer=self.tokenizer,
            use_chat_template=cfg.model.use_chat_template,
            system_prompt=cfg.model.system_prompt,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.data.max_response_tokens,
        )
        self.train_pairs = tokenize_pairs(train_examples, **tokenize, what="training pairs")
        self.val_pairs = tokenize_pairs(val_examples, **tokenize, what="validation pairs") if val_examples else []
        logger.info("%d training pairs, %d validation pairs", len(self.train_pairs), len(self.val_pairs))
        self.model = self._score_reference_and_load_policy(output_dir, resume_ckpt, compute_dtype)

        batch_size = cfg.trainer.batch_size
        self.sampler = EpochSampler(len(self.train_pairs), batch_size, cfg.seed, cfg.data.shuffle,
                                    epoch_bounded=not cfg.trainer.steps_cross_epochs)
        self.max_steps = cfg.trainer.max_steps or self.sampler.steps_for_epochs(cfg.trainer.num_epochs)
        logger.info("%d steps of <= %d pairs (%.3g epochs)", self.max_steps, batch_size,
                    self.sampler.epochs_for_steps(self.max_steps))
        log_small_data(len(self.train_pairs), len(self.train_pairs), batch_size, "trainer.batch_size", "pairs", "pairs",
                       cfg.trainer.steps_cross_epochs)
        # Same option names as GRPO's trainer section: one optimizer builder for every recipe.
        self.optimization = build_optimization(self.model, cfg.trainer, cfg.checkpoint.keep_last, output_dir,
                                               self.max_steps, resume_ckpt)
        self.start_step = self.optimization.start_step
        if self.optimization.resumed_state is not None:
            self.sampler.load_state_dict(self.optimization.resumed_state["sampler"])

        outputs = open_run_outputs(stack, output_dir, cfg, self.max_steps, self.start_step,
                                   resumed=resume_ckpt is not None)
        self.metrics_log, self.progress, self.guard = outputs.metrics, outputs.progress, outputs.guard
        self.completed, self.sampler_state = self.start_step, self.sampler.state_dict()
        self.skipped_steps = SkippedStepGuard(cfg.trainer.max_skipped_steps)

    def _score_reference_and_load_policy(self, output_dir: Path, resume_ckpt: Path | None,
                                         compute_dtype: torch.dtype) -> torch.nn.Module:
        """Reference logprobs of every pair, once for the whole run (cached in the run folder), then
        the policy that trains. The reference is the starting policy, so the model that scores the
        pairs is the one that then trains: one model in memory."""
        cfg, device = self.cfg, self.device
        all_pairs = self.train_pairs + self.val_pairs
        fingerprint = reference_fingerprint([cfg.model.path, cfg.model.gguf_file, str(compute_dtype)], all_pairs)
        model = None
        if not load_cached_reference(output_dir / REFERENCE_FILE, fingerprint, all_pairs):
            # LoRA: the starting model is the base, i.e. any adapter checkpoint with its adapters
            # disabled, so the model that trains (also a resumed one) scores the pairs: one load, no copy.
            lora_resume = resume_ckpt is not None and lora_enabled(cfg.model)
            model, _ = load_model_and_tokenizer(cfg.model, device, source=str(resume_ckpt) if lora_resume else None)
            logger.info("Computing reference logprobs of %d pairs with the starting model", len(all_pairs))
            with adapters_disabled(model):
                compute_reference_logps(model, all_pairs, micro_batch_size=cfg.trainer.micro_batch_size,
                                        pad_token_id=self.pad_token_id, device=device, autocast=self.autocast)
            save_reference(output_dir / REFERENCE_FILE, fingerprint, all_pairs)
        if model is None or (resume_ckpt is not None and not is_peft_model(model)):
            model = None
            gc.collect()  # free the starting weights before the checkpoint's are loaded
            model, _ = load_model_and_tokenizer(cfg.model, device, source=str(resume_ckpt) if resume_ckpt else None)
        return model

    def train(self) -> None:
        cfg, start_step, max_steps, progress = self.cfg, self.start_step, self.max_steps, self.progress
        try:
            for step in range(start_step + 1, max_steps + 1):
                step_metrics = self.step(step)
                progress.update(step, {"loss": step_metrics["loss"], "acc": step_metrics["rewards/accuracy"]})
                if due(step, cfg.logging.console_every):
                    progress.write(format_console_line(step, max_steps, step_metrics))
                if due(step, cfg.trainer.eval_every, max_steps) and self.val_pairs:
                    self.validate(step)
                if due(step, cfg.checkpoint.every, max_steps):
                    self.save_checkpoint()
            if self.val_pairs and self.completed > start_step:
                self.validate(self.completed)
            self.save_checkpoint()
        except KeyboardInterrupt:
            save_on_interrupt(self.completed, start_step, self.save_checkpoint, progress.write)
            raise

    def step(self, step: int) -> dict[str, float]:
        """One training step; returns its metrics."""
        step_start = time.perf_counter()
        # Seeding per step makes anything random (dropout) independent of earlier steps.
        seed_everything(self.cfg.seed * 1_000_003 + step)
        batch = [self.train_pairs[i] for i in self.sampler.next_batch()]

        # ---- policy update and its metrics line. Ctrl-C waits for both, so a checkpoint
        # holds whole steps and every checkpointed step has its line in metrics.jsonl.
        with self.guard.deferred():
            optimizer = self.optimization.optimizer
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler then moves on)
            update_metrics = preference_update(self.model, optimizer, self.optimization.scheduler, batch,
                                               self.cfg.algorithm, self.cfg.trainer, self.pad_token_id, self.device,
                                               self.autocast)
            elapsed = time.perf_counter() - step_start
            num_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
            step_metrics = {
                **update_metrics,
                "lr": lr,
                "perf/tokens_per_s": num_tokens / elapsed,
                "time/step": elapsed,
                "data/epoch": float(self.sampler.epoch),
                "data/pairs": float(len(batch)),  # fewer than batch_size at the end of an epoch
            }
            self.metrics_log.log(step, step_metrics)
            self.skipped_steps.record(step, not update_metrics["skipped_update"])
            self.completed, self.sampler_state = step, self.sampler.state_dict()
        return step_metrics

    def validate(self, step: int) -> None:
        with self.progress.phase("validating", pause=True):  # between steps: not in the ETA's step rate
            val = evaluate(self.model, self.val_pairs, self.cfg.algorithm, self.cfg.trainer.micro_batch_size,
                           self.pad_token_id, self.device, self.autocast)
        self.metrics_log.log(step, val)
        self.progress.write(f"validation at step {step} ({len(self.val_pairs)} pairs): "
                            + "  ".join(f"{k}={v:.4g}" for k, v in val.items()))

    def save_checkpoint(self) -> None:
        self.optimization.save(self.completed, self.model, self.tokenizer,
                               {"sampler": self.sampler_state, "seed": self.cfg.seed, "max_steps": self.max_steps},
                               save_optimizer=self.cfg.checkpoint.save_optimizer, progress=self.progress)


def pair_losses(
    model: torch.nn.Module, pairs: list[PreferencePair], algo: DPOAlgorithmConfig, pad_token_id: int,
    device: torch.device, autocast: Autocast,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``(B,)`` (differentiable, ``algo``'s loss) and per-pair metrics of one micro-batch.

    Sequence logprobs are sums over response tokens, or means for length-averaged losses (IPO);
    the stored reference sums are divided by the same lengths."""
    average = uses_length_average(algo.loss_type)
    logprobs, mask = pair_token_logps(model, pairs, pad_token_id, device, autocast)
    policy = sequence_logps(logprobs, mask, average=average)
    chosen, rejected = policy[: len(pairs)], policy[len(pairs):]
    ref_chosen = torch.tensor([p.ref_chosen_logps / (len(p.chosen_ids) if average else 1) for p in pairs], device=device)
    ref_rejected = torch.tensor([p.ref_rejected_logps / (len(p.rejected_ids) if average else 1) for p in pairs], device=device)
    if torch.isnan(ref_chosen).any() or torch.isnan(ref_rejected).any():
        raise RuntimeError("reference logprobs missing: call compute_reference_logps before training")
    losses, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=algo.beta, loss_type=algo.loss_type,
                               label_smoothing=algo.label_smoothing)
    return losses, {**metrics, "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def preference_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pairs: list[PreferencePair],
    algo: DPOAlgorithmConfig,
    trainer: DPOTrainerConfig,
    pad_token_id: int,
    device: torch.device,
    autocast: Autocast,
) -> dict[str, float]:
    """One optimizer step on ``pairs`` (the batch), accumulated over ``trainer.micro_batch_size``
    micro-batches. Each micro-batch's loss sum is divided by the whole batch's pair count, so the
    accumulated gradient is exactly that of the batch's mean loss, whatever the split."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for micro_batch in chunks(pairs, trainer.micro_batch_size):
        losses, metrics = pair_losses(model, micro_batch, algo, pad_token_id, device, autocast)
        (losses.sum() / len(pairs)).backward()
        for name, values in {"loss": losses.detach(), **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(values.float().sum())
    max_norm = trainer.max_grad_norm if trainer.max_grad_norm > 0 else float("inf")
    grad_norm = float(clip_and_step(optimizer, model.parameters(), max_norm))
    skipped = not math.isfinite(grad_norm)
    if skipped:
        logger.warning("non-finite gradient norm; optimizer step skipped")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = {name: total / len(pairs) for name, total in sums.items()}
    out["grad_norm"] = grad_norm
    out["skipped_update"] = float(skipped)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, pairs: list[PreferencePair], algo: DPOAlgorithmConfig, micro_batch_size: int,
    pad_token_id: int, device: torch.device, autocast: Autocast,
) -> dict[str, float]:
    """``val/*`` means over ``pairs``: loss, reward accuracy, margins, chosen/rejected rewards and logps."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for micro_batch in chunks(pairs, micro_batch_size):
        losses, metrics = pair_losses(model, micro_batch, algo, pad_token_id, device, autocast)
        for name, values in {"loss": losses, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(values.float().sum())
    model.train(was_training)
    return {f"val/{name}": total / max(len(pairs), 1) for name, total in sums.items()}
