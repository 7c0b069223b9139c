"""The policy update: ``ppo_epochs`` x mini-batches x micro-batches of any registered policy loss."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import numpy as np
import torch

from posttrain.algorithms import (
    Objective,
    OffPolicyCorrection,
    masked_sequence_counts,
    off_policy_metrics,
)
from posttrain.config import derived
from posttrain.config.schema import AlgorithmConfig, ModelConfig, MoEConfig, RolloutConfig, TrainerConfig
from posttrain.distributed import all_gather_objects, all_reduce_sum, get_world_size
from posttrain.trainer.memory import compiled
from posttrain.trainer.optim import clip_and_step
from posttrain.models import response_logprobs
from posttrain.models.moe import MoEUpdate
from posttrain.models.moe.hf_blocks import GroupedMoE
from posttrain.trainer.packing import packed_row_tokens, packs_samples, split_micro_batches
from posttrain.trainer.samples import (
    Sample,
    chunks,
    collate,
    grouped_moe_for_routes,
    logprob_mismatch_metrics,
    pad_rows,
    token_masks,
)

logger = logging.getLogger("posttrain.trainer")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On the device (see the metric sums in policy_update)."""
    return (values.detach().float() * mask).sum() / mask.sum().clamp(min=1)


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples: list[Sample],
    pad_token_id: int,
    device: torch.device,
    autocast,
    *,
    algo: AlgorithmConfig,
    trainer: TrainerConfig,
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    record_tokens: int = 0,
    old_from_update: bool = False,
) -> dict[str, float]:
    """``ppo_epochs`` x mini-batches x micro-batches. Each micro-batch loss is normalised by its
    mini-batch's global token/sequence count, so accumulated gradients equal the mini-batch's.

    Mini-batches hold ``trainer.mini_batch_size`` samples; when dynamic sampling kept fewer samples
    than ``rollout.batch_size``, the last mini-batch takes the remainder (a kept batch smaller than
    a mini-batch is one mini-batch), and the lr scheduler is still advanced by the configured
    ``ppo_epochs * rollout.batch_size / mini_batch_size`` steps, so the lr schedule follows training
    steps. With no samples at all no update is made (the scheduler still advances). Untrainable
    samples (``Sample.trainable``) have a zero loss mask and count in no normaliser.

    ``record_tokens``: the first that many samples of the first mini-batch get ``trainer_logprobs``
    and ``entropy`` per response token, from the forward pass of the first epoch. No optimizer step
    has run before it, so these are the logprobs of the weights the step started with, at no extra
    forward pass (samples.jsonl shows them beside the engine's).

    ``old_from_update``: the trainer's old logprobs (the ratio's denominator) are this update's own
    forward pass, detached, instead of a separate no-grad pass before it. Exact when the step makes
    one optimizer step (one epoch, one mini-batch: ``derived.optimizer_steps_per_step == 1``), since
    no weight has changed when each micro-batch runs its forward; verl does the same on-policy. The
    samples' ``old_logprobs`` are then the engine's: they become ``rollout_logprobs`` (the behaviour
    policy of ``algorithm.off_policy_correction``), the trainer's replace them after the update,
    and the engine/trainer mismatch metrics come back with the update's.

    The sections it reads: ``algo`` (the objective, ``ppo_epochs``), ``trainer`` (batch sizes, gradient
    clipping, ``compile_loss``), ``rollout`` (``temperature``, ``batch_size``, ``max_new_tokens``),
    ``model_cfg`` (``chunked_logprobs``, ``float32_logits``) and, for an MoE policy, ``moe_cfg``
    (``router``, ``router_replay``)."""
    scheduler_steps = derived.optimizer_steps_per_step(algo, rollout, trainer)
    if not samples:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(scheduler_steps):
                scheduler.step()
        return {"actor/skipped_updates": float(scheduler_steps)}
    # MoE policies: router losses join the policy loss, router metrics the update's (docs/moe.md).
    moe = MoEUpdate.for_model(model, moe_cfg.router, device)
    # Policy loss, KL, entropy, off-policy correction and the router losses' weights: the objective
    # of the algorithm section (and of moe.router for an MoE policy).
    objective = Objective.from_config(algo, router=moe_cfg.router if moe is not None else None)
    # Metrics are summed on the device and read once at the end: a read per micro-batch would make
    # the CPU wait for each backward pass before it can queue the next micro-batch's work.
    sums: dict[str, torch.Tensor] = {}
    num_tokens_total = torch.zeros((), dtype=torch.float64, device=device)
    grad_norms, losses = [], []
    packed = packs_samples(model, trainer.micro_batch_tokens, autocast)
    # N ranks: each holds 1/N of every mini-batch (its own prompt groups). The loss normalisers are
    # the mini-batch's global counts, and FSDP averages gradients over ranks, so each rank's loss is
    # scaled by N: the summed gradient is then exactly the one-process gradient of the mini-batch.
    world_size = get_world_size()
    # Router replay (R3): micro-batches whose samples carry the engine's routes use them (docs/moe.md).
    replay = grouped_moe_for_routes(model, samples) if moe is not None and moe_cfg.router_replay else None
    if trainer.compile_loss:
        objective = objective.with_policy_loss(compiled(objective.policy_loss))
    model.train()
    mini_batches = [(mini_batch, split_micro_batches(mini_batch, trainer.micro_batch_size, trainer.micro_batch_tokens, packed))
                    for _ in range(algo.ppo_epochs) for mini_batch in chunks(samples, trainer.mini_batch_size // world_size)]
    # Collated one ahead, after the current micro-batch's work is queued: the host builds the next
    # batch while the GPU runs, also across the gradient-norm sync that ends each mini-batch.
    collated = (collate(micro_batch, pad_token_id, device, packed,
                        packed_row_tokens(model, trainer.packed_row_tokens, micro_batch), routes=replay is not None)
                for _, micro_batches in mini_batches for micro_batch in micro_batches)
    next_batch = next(collated)
    if old_from_update and len(mini_batches) != 1:
        raise ValueError(f"old_from_update needs one optimizer step per step, not {len(mini_batches)}")
    # old_from_update: every sample's logprobs become its old logprobs after the update.
    record = {id(s) for s in (samples if old_from_update else mini_batches[0][0][:record_tokens])}
    recorded = []  # (micro-batch, logprobs, entropy) of the first mini-batch, read with the metrics
    for index, (mini_batch, micro_batches) in enumerate(mini_batches):
        trained = [s for s in mini_batch if s.trainable]
        num_tokens, num_sequences = all_reduce_sum([sum(s.num_loss_tokens for s in trained), len(trained)])
        num_tokens, num_sequences = max(num_tokens, 1.0), max(num_sequences, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        optimizer.zero_grad(set_to_none=True)
        for micro_batch in micro_batches:
            batch = next_batch
            mask = batch.loss_mask
            with autocast(), _replaying(replay, batch.routes), \
                    (moe.recording() if moe is not None else contextlib.nullcontext()) as routes:
                logprobs, entropy = response_logprobs(
                    model, batch.tokens, temperature=rollout.temperature,
                    with_entropy=True, entropy_grad=algo.entropy_coef > 0,
                    chunk_size=model_cfg.chunked_logprobs, float32_logits=model_cfg.float32_logits,
                )
            if index == 0 and record:
                recorded.append((micro_batch, logprobs.detach(), entropy.detach()))
            old, behaviour = batch.old_logprobs, batch.rollout_logprobs
            if old_from_update:  # no weight has changed yet: this pass is the old policy's
                old, behaviour = logprobs.detach(), batch.old_logprobs
            per_token, pg_metrics, token_terms = objective.token_loss(
                logprobs, old, batch.advantages, mask, entropy,
                rollout_logprobs=behaviour, ref_logprobs=batch.ref_logprobs,
            )
            loss = objective.aggregate(per_token, mask, num_tokens=num_tokens, num_sequences=num_sequences,
                                       norm_length=float(rollout.max_new_tokens))
            # Under replay the experts used are the replayed ones: the load and the aux loss count those.
            router_loss = objective.router_loss(*moe.loss_terms(routes, batch.tokens, mask, num_tokens,
                                                                selected=batch.routes)) if moe is not None else 0.0
            with _replaying(replay, batch.routes):  # gradient checkpointing recomputes the MoE blocks here
                ((loss + router_loss) * world_size).backward()
            loss_total += loss.detach()
            # Token-weighted sums, so logged means do not depend on the micro-batch split.
            micro_tokens = mask.sum().double()
            num_tokens_total += micro_tokens
            for name, value in {**pg_metrics, **{k: _masked_mean(v, mask) for k, v in token_terms.items()}}.items():
                value = torch.as_tensor(value, device=device).detach().double()
                sums[name] = sums.get(name, 0.0) + value * micro_tokens
            next_batch = next(collated, None)
        max_norm = trainer.max_grad_norm if trainer.max_grad_norm > 0 else float("inf")
        # Global over ranks (all skip or none); read with the metrics at the end, not here.
        grad_norms.append(clip_and_step(optimizer, model.parameters(), max_norm).to(device, torch.float64))
        losses.append(loss_total)
        scheduler.step()
    for _ in range(scheduler_steps - len(losses)):
        scheduler.step()  # fewer kept samples than rollout.batch_size: keep the schedule on the step clock
    optimizer.zero_grad(set_to_none=True)
    names = sorted(sums)  # the same names on every rank
    # The one read of everything summed on the device: the host waits for the GPU only here.
    host = torch.stack([num_tokens_total, *(sums[k] for k in names), *losses, *grad_norms]).tolist()
    num_tokens_total, *totals = all_reduce_sum(host[: 1 + len(names) + len(losses)])
    totals, losses, grad_norms = totals[: len(names)], totals[len(names):], host[1 + len(names) + len(losses):]
    sums = dict(zip(names, totals))
    for micro_batch, logprobs, entropy in recorded:
        logprobs, entropy = logprobs.float().cpu(), entropy.float().cpu()
        for i, s in enumerate(micro_batch):
            if id(s) in record:
                n = len(s.response_ids)
                s.trainer_logprobs, s.entropy = logprobs[i, :n].tolist(), entropy[i, :n].tolist()
    mismatch = {}
    if old_from_update:
        for s in samples:
            s.rollout_logprobs, s.old_logprobs = s.old_logprobs, s.trainer_logprobs
        mismatch = logprob_mismatch_metrics(samples)
    # Samples whose old logprobs the trainer recomputed keep the engine's: their ratio drives
    # algorithm.off_policy_correction and the off_policy/* metrics.
    step_metrics = _off_policy_step_metrics(samples, objective.correction)
    finite_norms = [norm for norm in grad_norms if math.isfinite(norm)]
    skipped = len(grad_norms) - len(finite_norms)
    for _ in range(skipped):
        logger.warning("non-finite gradient norm; optimizer step skipped")
    denom = max(num_tokens_total, 1.0)
    out = {f"actor/{k}": v / denom for k, v in sums.items()}
    out["loss/policy"] = sum(losses) / len(losses)
    out["grad_norm"] = sum(finite_norms) / len(finite_norms) if finite_norms else float("nan")
    out["actor/skipped_updates"] = float(skipped)
    if "actor/kl" in out:
        out["kl"] = out.pop("actor/kl")
    out["entropy"] = out.pop("actor/entropy")
    if moe is not None:
        out.update(moe.metrics(all_reduce_sum))
    out.update(step_metrics)
    out.update(mismatch)
    return out


def _replaying(moe: GroupedMoE | None, routes: list[torch.Tensor] | None) -> contextlib.AbstractContextManager:
    """Router replay of a micro-batch's engine routes (``TrainBatch.routes``), or nothing."""
    return moe.replaying(routes) if moe is not None and routes is not None else contextlib.nullcontext()


def _off_policy_step_metrics(samples: list[Sample], correction: OffPolicyCorrection) -> dict[str, float]:
    """``off_policy_metrics`` over every trained token of the step, on all ranks. Computed once from
    the samples (old and behaviour logprobs do not change during the update); quantiles need every
    token, so ranks gather their valid tokens' (old, behaviour, weight) values, and the counts of
    masked sequences.

    Logged by every run: samples whose old logprobs were not recomputed (``rollout.backend=hf``,
    whose logprobs are the trainer's own forward pass, or ``rollout.recompute_logprobs=false``) use
    the engine's logprobs as the old policy, so their behaviour policy is the old one: ratio 1,
    mismatch 0, nothing masked, which is what the metrics then say."""
    width = max(len(s.response_ids) for s in samples)
    mask = token_masks(samples, width) * torch.tensor([[float(s.trainable)] for s in samples])
    old = pad_rows([s.old_logprobs for s in samples], width, "cpu")
    behaviour = pad_rows([s.rollout_logprobs if s.rollout_logprobs is not None else s.old_logprobs for s in samples],
                         width, "cpu")
    weights = correction.weights(old, behaviour, mask)
    valid = mask.bool()
    # Only valid tokens travel: the token metrics are per-token statistics, so one flat row is exact;
    # the sequence fractions come from each rank's counts.
    local = (torch.stack([old[valid], behaviour[valid], weights[valid]]).numpy(), masked_sequence_counts(weights, mask))
    gathered = all_gather_objects(local)
    tokens = torch.from_numpy(np.concatenate([g[0] for g in gathered], axis=1))
    metrics = off_policy_metrics(tokens[0:1], tokens[1:2], torch.ones_like(tokens[0:1]), tokens[2:3])
    sequences, partly_masked, dropped = (sum(g[1][i] for g in gathered) for i in range(3))
    if metrics:
        metrics["off_policy/masked_seq_fraction"] = partly_masked / sequences
        metrics["off_policy/dropped_seq_fraction"] = dropped / sequences
    return metrics
