"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from posttrain.config.schema import TrainerConfig
from posttrain.distributed import clip_grad_norm
from posttrain.trainer.master_weights import MasterWeightAdamW


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # One kernel for all parameters on GPU (trainer.fused_adamw); the for-each path on CPU, also for
    # CPU-offloaded FSDP shards.
    fused = params[0].device.type == "cuda" and getattr(cfg, "fused_adamw", True)
    # trainer.master_weights: 16-bit parameters get float32 masters and moments inside the optimizer.
    # Only where the parameters are 16-bit (prepare_for_training made them so): float32 ones already
    # are the masters (e.g. a PPO critic, or a recipe that keeps float32 parameters).
    masters = getattr(cfg, "master_weights", False) and any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    return (MasterWeightAdamW if masters else torch.optim.AdamW)(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def clip_and_step(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """Clips the gradients to a global norm of ``max_norm`` and takes the optimizer step, unless
    their norm is not finite (a NaN/inf gradient would poison the weights for good). Returns the
    norm before clipping, a 0-d tensor; the caller reads it when it needs the value.

    With a fused AdamW and unsharded gradients the host does not wait for the backward pass here:
    the norm stays on the device, and the fused kernel skips the whole update (moments and step
    count included) when it is not finite, through the ``found_inf`` input AMP's GradScaler uses.
    Otherwise (for-each AdamW, FSDP's sharded gradients) the norm is read on the host, global over
    ranks, and the step skipped there.

    With trainer.master_weights the gradients are on the optimizer's float32 masters, not on
    ``parameters``: those are clipped and stepped (the masters' step also refreshes the bf16
    parameters)."""
    if isinstance(optimizer, MasterWeightAdamW):
        parameters = optimizer.clip_grad_candidates()  # the float32 masters hold the accumulated gradients
    params = [p for p in parameters if p.grad is not None]
    if getattr(optimizer, "defaults", {}).get("fused") and not any(isinstance(p.grad, DTensor) for p in params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.found_inf = (~norm.isfinite()).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return norm
    norm = clip_grad_norm(params, max_norm)
    if math.isfinite(norm):
        optimizer.step()
    elif isinstance(optimizer, MasterWeightAdamW):
        optimizer.zero_grad()  # the skipped step's float32 gradients must not join the next step's
    return torch.tensor(norm)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then the schedule."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_optimizer_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            warmup_steps=cfg.warmup_steps,
            total_steps=total_optimizer_steps,
            schedule=cfg.lr_scheduler,
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )


def follow_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint's optimizer and scheduler state, continue *this* run's schedule.

    The saved optimizer holds the lr the saving run's schedule had reached; when a run is
    extended (2 steps, then ``--resume`` with max_steps=3) a decaying schedule had ended at 0
    there, but must now continue over the new total, from this run's peak lr."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lr_lambda(scheduler.last_epoch)
