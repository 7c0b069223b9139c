"""The GRPO recipe. Read ``train`` top to bottom: build the parts, then per step
sample prompts -> generate a group per prompt -> score (with dynamic sampling: more rounds until
enough groups are informative) -> reference logprobs -> advantages -> policy update -> log,
validate, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.algorithms import (
    aggregate_loss,
    folds_kl_into_reward,
    get_advantage_estimator,
    get_policy_loss,
    informative_groups,
    kl_penalty,
    overlong_penalty,
    truncated_is_weights,
)
from posttrain.checkpoint.manager import CheckpointManager
from posttrain.config.loader import config_to_dict, config_to_yaml
from posttrain.config.schema import GRPOConfig
from posttrain.data.prompts import load_prompt_data
from posttrain.data.sampler import EpochSampler
from posttrain.envs.registry import check_env_kwargs, check_required_metadata, resolve_env_class
from posttrain.envs.reward_pool import RewardPool
from posttrain.logging.metrics import MetricsLogger, format_console_line
from posttrain.logging.progress import ProgressBar
from posttrain.models import (
    TokenizedPrompt,
    encode_prompts,
    load_model_and_tokenizer,
    make_reference_model,
    resolve_compute_dtype,
    resolve_device,
    response_logprobs,
)
from posttrain.models.lora import adapters_disabled, checkpoint_prefix, is_peft_model
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf_engine import HFEngine
from posttrain.trainer.interrupt import InterruptGuard
from posttrain.trainer.common import log_to_file, masked_mean, resolve_output_dir, seed_everything
from posttrain.trainer.optim import build_optimizer, build_scheduler, follow_schedule
from posttrain.trainer.samples import Sample, chunks, collate, pad_rows
from posttrain.trainer.validation import validate

logger = logging.getLogger("posttrain.trainer")


def train(cfg: GRPOConfig, resume_from: str | None = None) -> Path:
    """Run GRPO; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    # Cheap checks first, so a bad environment fails before anything is loaded or written.
    env_cls = resolve_env_class(cfg.env.cls)
    check_env_kwargs(env_cls, cfg.env.kwargs)
    resume_ckpt = CheckpointManager.resolve(resume_from) if resume_from else None
    output_dir = resolve_output_dir(cfg.trainer.output_dir, resume_ckpt, "grpo")
    output_dir.mkdir(parents=True, exist_ok=True)
    log_to_file(output_dir / "train.log")
    (output_dir / "config.yaml").write_text(config_to_yaml(cfg))
    logger.info("Run folder: %s", output_dir)
    seed_everything(cfg.seed)

    # ---- build the parts. Data first: rows the environment cannot score (e.g. no reference
    # answer) fail here, before the model loads, not as all-zero rewards at step 1.
    train_examples, val_examples = load_prompt_data(cfg.data, cfg.seed)
    if cfg.validation.max_prompts:
        val_examples = val_examples[: cfg.validation.max_prompts]
    check_required_metadata(env_cls, train_examples, "training prompts")
    check_required_metadata(env_cls, val_examples, "validation prompts")
    device = resolve_device(cfg.model.device)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, device)
    if device.type == "cpu" and cfg.rollout.batch_size * cfg.rollout.max_new_tokens >= 8192:
        logger.warning(
            "Training on CPU: each step generates %d completions of up to %d tokens and takes minutes. "
            "For a quick look use `--config cpu_quick`.", cfg.rollout.batch_size, cfg.rollout.max_new_tokens,
        )
    model, tokenizer = load_model_and_tokenizer(cfg.model, device, source=str(resume_ckpt) if resume_ckpt else None)
    reference = None
    # LoRA: the reference is the policy itself with its adapters disabled (the frozen base), no copy.
    if cfg.algorithm.kl_coef > 0 and not is_peft_model(model):
        # The reference is always the starting model, also when resuming from a later checkpoint.
        reference = make_reference_model(model if resume_ckpt is None else load_model_and_tokenizer(cfg.model, device)[0])
    encode = dict(
        tokenizer=tokenizer,
        use_chat_template=cfg.model.use_chat_template,
        system_prompt=cfg.model.system_prompt,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )
    train_prompts = encode_prompts(train_examples, **encode, what="training prompts")
    val_prompts = encode_prompts(val_examples, **encode, what="validation prompts")
    engine = HFEngine(
        model, tokenizer, generation_batch_size=cfg.rollout.generation_batch_size, compute_dtype=compute_dtype
    )
    group_size = cfg.rollout.group_size
    sampler = EpochSampler(len(train_prompts), cfg.rollout.batch_size // group_size, cfg.seed, cfg.data.shuffle)
    optimizer_steps_per_step = cfg.algorithm.ppo_epochs * (cfg.rollout.batch_size // cfg.trainer.mini_batch_size)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, cfg.trainer.max_steps * optimizer_steps_per_step)
    checkpoints = CheckpointManager(output_dir, cfg.checkpoint.keep_last, prefix=checkpoint_prefix(model))
    start_step = 0
    if resume_ckpt is not None:
        state = checkpoints.load_trainer_state(resume_ckpt, optimizer, scheduler)
        follow_schedule(optimizer, scheduler, cfg.trainer.lr)
        start_step = state["step"]
        sampler.load_state_dict(state["sampler"])
        logger.info("Resumed from %s at step %d", resume_ckpt, start_step)
    sampling = SamplingParams(
        n=group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_tokens=cfg.rollout.max_new_tokens,
        stop=list(cfg.rollout.stop),
    )
    algo = cfg.algorithm
    estimator = get_advantage_estimator(algo.advantage)
    target_groups = cfg.rollout.batch_size // group_size
    val_max_tokens = cfg.validation.max_new_tokens or cfg.rollout.max_new_tokens

    with contextlib.ExitStack() as stack:
        rewards = stack.enter_context(RewardPool(cfg.env.cls, cfg.env.kwargs, cfg.env.num_workers, cfg.env.timeout_s))
        metrics_log = stack.enter_context(
            MetricsLogger(output_dir, cfg.logging, config_to_dict(cfg), resume_step=start_step if resume_ckpt else None)
        )
        progress = ProgressBar(cfg.trainer.max_steps, initial=start_step, enabled=cfg.logging.progress_bar)
        stack.callback(progress.close)
        guard = stack.enter_context(InterruptGuard())

        def run_validation(step: int) -> None:
            progress.write(f"validation at step {step} ({len(val_prompts)} prompts, greedy)")
            val = validate(
                engine, rewards, val_prompts, max_tokens=val_max_tokens, stop=list(cfg.rollout.stop),
                print_samples=cfg.validation.print_samples, write=progress.write,
            )
            metrics_log.log(step, val)
            progress.write("  " + "  ".join(f"{k}={v:.4g}" for k, v in val.items()))

        completed = start_step
        sampler_state = sampler.state_dict()

        def save_checkpoint() -> None:
            path = checkpoints.save(
                completed, model, tokenizer,
                {"sampler": sampler_state, "seed": cfg.seed},
                optimizer if cfg.checkpoint.save_optimizer else None,
                scheduler if cfg.checkpoint.save_optimizer else None,
            )
            progress.write(f"saved checkpoint {path}")

        try:
            if cfg.validation.at_start and start_step == 0 and val_prompts:
                run_validation(0)
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                step_start = time.perf_counter()
                # Seeding per step makes sampling independent of anything before: resume is exact.
                seed_everything(cfg.seed * 1_000_003 + step)

                # ---- rollouts and rewards (worker processes). Dynamic sampling (DAPO) drops groups
                # whose rewards are all equal and draws more rounds of prompts to refill the batch.
                rounds = [generate_and_score(engine, rewards, sampler, train_prompts, sampling, cfg)]
                while (algo.dynamic_sampling and len(rounds) < algo.max_sampling_rounds
                       and sum(int(informative_groups(r.shaped_rewards, group_size).sum()) for r in rounds) < target_groups):
                    rounds.append(generate_and_score(engine, rewards, sampler, train_prompts, sampling, cfg))
                rollouts = Rollouts.concat(rounds)  # everything generated: the step's reward metrics
                batch = rollouts.keep_informative_groups(group_size, target_groups) if algo.dynamic_sampling else rollouts
                _, env_metrics = rewards.post_process(
                    {"rewards": rollouts.rewards, "metadata": rollouts.metadata, "message_logs": rollouts.message_logs, "answers": rollouts.answers}
                )

                # ---- reference logprobs and advantages of the completions trained on
                samples = [
                    Sample(p.token_ids, c.token_ids, c.logprobs, 0.0, r, trainable=not (algo.mask_truncated and c.finish_reason == "length"))
                    for p, c, r in zip(batch.prompts, batch.completions, batch.shaped_rewards.tolist())
                ]
                if cfg.algorithm.kl_coef > 0:
                    fill_reference_logprobs(reference if reference is not None else model, samples, cfg, tokenizer.pad_token_id, device, engine.autocast)
                if cfg.algorithm.is_correction_cap > 0:
                    recompute_old_logprobs(model, samples, cfg, tokenizer.pad_token_id, device, engine.autocast)
                assign_advantages(estimator, samples, batch.shaped_rewards, cfg)
                t_scored = time.perf_counter()
                if not samples:
                    logger.warning("step %d: no group with differing rewards after %d sampling rounds; update skipped", step, len(rounds))

                # ---- policy update and its metrics line. Ctrl-C waits for both, so a checkpoint
                # holds whole steps and every checkpointed step has its line in metrics.jsonl.
                with guard.deferred():
                    update_metrics = policy_update(model, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id, device, engine.autocast)
                    t_trained = time.perf_counter()

                    # ---- metrics
                    num_response_tokens = sum(len(c.token_ids) for c in rollouts.completions)
                    step_metrics = {
                        **rollout_metrics(rollouts, env_metrics, group_size),
                        **shaping_metrics(cfg, rollouts, batch, samples, len(rounds), group_size),
                        **update_metrics,
                        "lr": scheduler.get_last_lr()[0],
                        "perf/tokens_per_s": num_response_tokens / (t_trained - step_start),
                        "perf/gen_tokens_per_s": num_response_tokens / rollouts.generate_s,
                        "time/generate": rollouts.generate_s,
                        "time/score": t_scored - step_start - rollouts.generate_s,
                        "time/train": t_trained - t_scored,
                        "time/step": t_trained - step_start,
                        "data/epoch": float(sampler.epoch),
                    }
                    metrics_log.log(step, step_metrics)
                    completed, sampler_state = step, sampler.state_dict()

                progress.update(step, {"reward": step_metrics["reward/mean"], **({"acc": env_metrics["accuracy"]} if "accuracy" in env_metrics else {})})
                if cfg.logging.console_every and step % cfg.logging.console_every == 0:
                    progress.write(format_console_line(step, cfg.trainer.max_steps, step_metrics))

                if cfg.validation.every and step % cfg.validation.every == 0 and step != cfg.trainer.max_steps:
                    run_validation(step)
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.trainer.max_steps:
                    save_checkpoint()

            if cfg.validation.at_end and val_prompts and completed > start_step:
                run_validation(completed)
            save_checkpoint()
        except KeyboardInterrupt:
            if completed > start_step:
                progress.write(f"interrupted: saving a checkpoint at the last completed step ({completed})")
                save_checkpoint()
            else:
                progress.write("interrupted before a step completed: no new checkpoint to save")
            raise
    return output_dir


@dataclass
class Rollouts:
    """Scored completions of one or more generation rounds, in groups of ``group_size`` rows."""

    prompts: list[Any]  # EncodedPrompt per completion
    completions: list[Any]  # rollout.base.Completion
    message_logs: list[Any]
    rewards: torch.Tensor  # (N,) environment rewards
    shaped_rewards: torch.Tensor  # (N,) rewards + overlong penalty: what the advantages see
    metadata: list[dict]
    answers: list[Any]
    errors: list[str | None]
    generate_s: float = 0.0
    score_s: float = 0.0

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        if len(parts) == 1:
            return parts[0]
        return Rollouts(
            *(sum((getattr(p, name) for p in parts), []) for name in ("prompts", "completions", "message_logs")),
            torch.cat([p.rewards for p in parts]), torch.cat([p.shaped_rewards for p in parts]),
            *(sum((getattr(p, name) for p in parts), []) for name in ("metadata", "answers", "errors")),
            sum(p.generate_s for p in parts), sum(p.score_s for p in parts),
        )

    def keep_informative_groups(self, group_size: int, max_groups: int) -> Rollouts:
        """The first ``max_groups`` groups whose shaped rewards are not all equal (may be fewer, or none)."""
        groups = informative_groups(self.shaped_rewards, group_size).nonzero().flatten().tolist()[:max_groups]
        rows = [g * group_size + j for g in groups for j in range(group_size)]
        index = torch.tensor(rows, dtype=torch.long)
        return Rollouts(
            *([getattr(self, name)[i] for i in rows] for name in ("prompts", "completions", "message_logs")),
            self.rewards[index], self.shaped_rewards[index],
            *([getattr(self, name)[i] for i in rows] for name in ("metadata", "answers", "errors")),
            self.generate_s, self.score_s,
        )


def assign_advantages(estimator: Callable, samples: list[Sample], rewards: torch.Tensor, cfg: GRPOConfig) -> None:
    """Set every sample's per-token advantages from ``rewards`` (N,), group-contiguous.

    Every estimator gets the same arguments (see posttrain.algorithms.advantages). The response
    mask is the *loss* mask, so untrainable samples (truncated, with mask_truncated) get zero
    advantages and stay out of batch statistics such as REINFORCE++'s whitening. Estimators that
    fold the KL into the reward get the per-token KL of the sampled tokens (needs ref_logprobs).
    """
    if not samples:
        return
    algo = cfg.algorithm
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    width = max(int(lengths.max()), 1)
    trainable = torch.tensor([s.trainable for s in samples])
    mask = (torch.arange(width) < lengths[:, None]) & trainable[:, None]
    token_kl = None
    if folds_kl_into_reward(estimator) and algo.kl_coef > 0:
        old = pad_rows([s.old_logprobs for s in samples], width, "cpu")
        ref = pad_rows([s.ref_logprobs for s in samples], width, "cpu")
        token_kl = kl_penalty(old, ref, algo.kl_estimator)
    advantages = estimator(
        rewards, mask, group_size=cfg.rollout.group_size, scale_by_std=algo.scale_by_std,
        token_kl=token_kl, kl_coef=algo.kl_coef,
    )
    for s, row in zip(samples, advantages.tolist()):
        s.advantage = row[: len(s.response_ids)]


def shaping_metrics(cfg: GRPOConfig, rollouts: Rollouts, batch: Rollouts, samples: list[Sample],
                     num_rounds: int, group_size: int) -> dict[str, float]:
    """Metrics of the DAPO switches that are on."""
    algo, out = cfg.algorithm, {}
    if algo.overlong_buffer > 0:
        out["reward/overlong_penalty_mean"] = (rollouts.shaped_rewards - rollouts.rewards).mean().item()
    if algo.mask_truncated:
        out["response/masked_fraction"] = sum(not s.trainable for s in samples) / max(len(samples), 1)
    if algo.dynamic_sampling:
        out["data/sampling_rounds"] = float(num_rounds)
        out["reward/kept_group_fraction"] = len(batch.completions) / len(rollouts.completions)
    return out


def rollout_metrics(rollouts: Rollouts, env_metrics: dict[str, float], group_size: int) -> dict[str, float]:
    """Reward and response metrics of every completion generated in a step."""
    completions, rewards = rollouts.completions, rollouts.rewards
    lengths = [len(c.token_ids) for c in completions]
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        **{f"reward/{k}": float(v) for k, v in env_metrics.items()},
        "reward/errors": float(sum(e is not None for e in rollouts.errors)),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    if group_size > 1:  # groups whose completions all scored the same teach nothing
        metrics["reward/zero_std_groups"] = (rewards.view(-1, group_size).std(dim=1) == 0).float().mean().item()
    return metrics


def generate_and_score(
    engine: HFEngine,
    rewards: RewardPool,
    sampler: EpochSampler,
    train_prompts: list[TokenizedPrompt],
    sampling: SamplingParams,
    cfg: GRPOConfig,
) -> Rollouts:
    """One round: the sampler's next prompts -> ``sampling.n`` completions each -> rewards."""
    start = time.perf_counter()
    batch_prompts = [train_prompts[i] for i in sampler.next_batch()]
    groups = engine.generate([p.token_ids for p in batch_prompts], sampling)
    completions = [c for group in groups for c in group]
    prompts = [p for p in batch_prompts for _ in range(sampling.n)]
    generated = time.perf_counter()
    message_logs = [p.messages + [{"role": "assistant", "content": c.text}] for p, c in zip(prompts, completions)]
    scored = rewards.score(message_logs, [p.metadata for p in prompts])
    # DAPO overlong shaping: the advantages (and dynamic sampling) see the shaped rewards.
    algo = cfg.algorithm
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    shaped = scored.rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    return Rollouts(prompts, completions, message_logs, scored.rewards, shaped, scored.metadata,
                    scored.answers, scored.errors, generated - start, time.perf_counter() - generated)


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples: list[Sample],
    cfg: GRPOConfig,
    pad_token_id: int,
    device: torch.device,
    autocast,
) -> dict[str, float]:
    """``ppo_epochs`` x mini-batches x micro-batches. Each micro-batch loss is normalised by its
    mini-batch's global token/sequence count, so accumulated gradients equal the mini-batch's.

    Mini-batches hold ``trainer.mini_batch_size`` samples; when dynamic sampling kept fewer samples
    than ``rollout.batch_size``, the last mini-batch takes the remainder (a kept batch smaller than
    a mini-batch is one mini-batch), and the lr scheduler is still advanced by the configured
    ``ppo_epochs * rollout.batch_size / mini_batch_size`` steps, so the lr schedule follows training
    steps. With no samples at all no update is made (the scheduler still advances). Untrainable
    samples (``Sample.trainable``) have a zero loss mask and count in no normaliser."""
    algo, trainer = cfg.algorithm, cfg.trainer
    scheduler_steps = algo.ppo_epochs * (cfg.rollout.batch_size // trainer.mini_batch_size)
    if not samples:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(scheduler_steps):
                scheduler.step()
        return {"actor/skipped_updates": float(scheduler_steps)}
    policy_loss = get_policy_loss(algo.policy_loss)
    # Every policy loss takes the same keywords and ignores the ones it does not use.
    loss_options = dict(
        clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high, dual_clip_c=algo.dual_clip_c,
        gspo_clip_low=algo.gspo_clip_low, gspo_clip_high=algo.gspo_clip_high,
    )
    # REINFORCE++ puts the KL into the reward; it is then logged but not added to the loss again.
    kl_in_loss = not folds_kl_into_reward(get_advantage_estimator(algo.advantage))
    sums: dict[str, float] = {}
    num_tokens_total = 0.0
    grad_norms, losses = [], []
    skipped = 0
    model.train()
    for _ in range(algo.ppo_epochs):
        for mini_batch in chunks(samples, trainer.mini_batch_size):
            trained = [s for s in mini_batch if s.trainable]
            num_tokens = float(max(sum(len(s.response_ids) for s in trained), 1))
            num_sequences = float(max(len(trained), 1))
            loss_total = 0.0
            optimizer.zero_grad(set_to_none=True)
            for micro_batch in chunks(mini_batch, trainer.micro_batch_size):
                batch = collate(micro_batch, pad_token_id, device)
                mask = batch.loss_mask
                with autocast():
                    logprobs, entropy = response_logprobs(
                        model, batch.tokens, temperature=cfg.rollout.temperature,
                        with_entropy=True, entropy_grad=algo.entropy_coef > 0,
                    )
                per_token, pg_metrics = policy_loss(
                    logprobs, batch.old_logprobs, batch.advantages, mask, **loss_options
                )
                token_terms = {"entropy": entropy, "logprob_diff": (logprobs - batch.old_logprobs).abs()}
                if batch.rollout_logprobs is not None:
                    is_weights = truncated_is_weights(batch.old_logprobs, batch.rollout_logprobs, mask, algo.is_correction_cap)
                    per_token = per_token * is_weights
                    token_terms["is_weight"] = is_weights
                    token_terms["rollout_logprob_diff"] = (batch.old_logprobs - batch.rollout_logprobs).abs()
                if batch.ref_logprobs is not None:
                    kl = kl_penalty(logprobs, batch.ref_logprobs, algo.kl_estimator)
                    if kl_in_loss:
                        per_token = per_token + algo.kl_coef * kl
                    token_terms["kl"] = kl
                if algo.entropy_coef > 0:
                    per_token = per_token - algo.entropy_coef * entropy
                loss = aggregate_loss(
                    per_token, mask, algo.loss_agg_mode,
                    num_tokens=num_tokens, num_sequences=num_sequences, norm_length=float(cfg.rollout.max_new_tokens),
                )
                loss.backward()
                loss_total += loss.item()
                # Token-weighted sums, so logged means do not depend on the micro-batch split.
                micro_tokens = mask.sum().item()
                num_tokens_total += micro_tokens
                for name, value in {**pg_metrics, **{k: masked_mean(v, mask) for k, v in token_terms.items()}}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * micro_tokens
            max_norm = trainer.max_grad_norm if trainer.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            losses.append(loss_total)
            if math.isfinite(grad_norm):
                grad_norms.append(grad_norm)
                optimizer.step()
            else:
                # A NaN/inf gradient would poison the weights for good: drop this update instead.
                skipped += 1
                logger.warning("non-finite gradient norm; optimizer step skipped")
            scheduler.step()
    for _ in range(scheduler_steps - len(losses)):
        scheduler.step()  # fewer kept samples than rollout.batch_size: keep the schedule on the step clock
    optimizer.zero_grad(set_to_none=True)
    denom = max(num_tokens_total, 1.0)
    out = {f"actor/{k}": v / denom for k, v in sums.items()}
    out["loss/policy"] = sum(losses) / len(losses)
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["actor/skipped_updates"] = float(skipped)
    if "actor/kl" in out:
        out["kl"] = out.pop("actor/kl")
    out["entropy"] = out.pop("actor/entropy")
    return out


@torch.no_grad()
def fill_reference_logprobs(reference, samples: list[Sample], cfg: GRPOConfig, pad_token_id: int, device, autocast) -> None:
    """``reference``: the frozen copy, or with LoRA the policy itself, run with adapters disabled."""
    with adapters_disabled(reference):
        for s, logprobs in zip(samples, _sample_logprobs(reference, samples, cfg, pad_token_id, device, autocast)):
            s.ref_logprobs = logprobs


def recompute_old_logprobs(model, samples: list[Sample], cfg: GRPOConfig, pad_token_id: int, device, autocast) -> None:
    """Truncated IS correction: the trainer's own logprobs become the old logprobs of the ratio;
    the engine's are kept as rollout logprobs for the importance weight."""
    was_training = model.training
    model.eval()
    try:
        for s, logprobs in zip(samples, _sample_logprobs(model, samples, cfg, pad_token_id, device, autocast)):
            s.rollout_logprobs, s.old_logprobs = s.old_logprobs, logprobs
    finally:
        model.train(was_training)


@torch.no_grad()
def _sample_logprobs(model, samples: list[Sample], cfg: GRPOConfig, pad_token_id: int, device, autocast) -> list[list[float]]:
    out: list[list[float]] = []
    for micro_batch in chunks(samples, cfg.trainer.micro_batch_size):
        batch = collate(micro_batch, pad_token_id, device)
        with autocast():
            logprobs, _ = response_logprobs(model, batch.tokens, temperature=cfg.rollout.temperature)
        logprobs = logprobs.float().cpu()
        out += [logprobs[i, : len(s.response_ids)].tolist() for i, s in enumerate(micro_batch)]
    return out
