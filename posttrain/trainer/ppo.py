"""The PPO recipe (with a learned critic). ``train`` builds the parts once (the policy as in GRPO,
trainer/builder.py, plus a value model with its own optimizer), then runs ``PPORecipe.step`` per
step: sample prompts -> generate -> score -> reference logprobs (kl_coef > 0) -> values from the
critic -> GAE on KL-shaped per-token rewards -> policy update (GRPO's, with per-token advantages;
skipped during critic warm-up) and critic update -> metrics; then validation and checkpoints.

The building blocks (Rollouts, policy_update, reference logprobs, shaping metrics) are GRPO's."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from posttrain.algorithms import (
    aggregate_loss,
    compute_gae,
    explained_variance,
    kl_penalty,
    normalize_advantages,
    resolved_off_policy_correction,
    rlhf_token_rewards,
    value_loss,
)
from posttrain.checkpoint.manager import _torch_load
from posttrain.checkpoint.rng import seed_everything
from posttrain.config import derived
from posttrain.config.ppo_schema import CriticConfig, PPOAlgorithmConfig, PPOConfig
from posttrain.config.schema import LoRAConfig, ModelConfig, TrainerConfig
from posttrain.logging.metrics import format_console_line
from posttrain.models import model_source
from posttrain.models.loading import load_model
from posttrain.models.lora import is_peft_model
from posttrain.models.value_model import ValueModel
from posttrain.trainer.async_rollouts import token_staleness_metrics
from posttrain.trainer.builder import RLRun, build_rl_run, open_rl_outputs
from posttrain.trainer.common import SkippedStepGuard, due, masked_mean, save_on_interrupt
from posttrain.trainer.optim import build_optimizer, build_scheduler, clip_and_step, follow_schedule
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import (
    Rollouts,
    engine_metrics,
    fill_reference_logprobs,
    generate_and_score,
    old_logprobs_from_update,
    recompute_old_logprobs,
    rollout_metrics,
    shaping_metrics,
    timing_metrics,
)
from posttrain.trainer.samples import Sample, chunks, collate, pad_rows
from posttrain.trainer.validation import validate

logger = logging.getLogger("posttrain.trainer")

CRITIC_SUBDIR = "critic"
CRITIC_OPTIMIZER_FILE = "optimizer.pt"
CRITIC_SCHEDULER_FILE = "scheduler.pt"


def train(cfg: PPOConfig, resume_from: str | None = None) -> Path:
    """Run PPO; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    run = build_rl_run(cfg, resume_from, "ppo", memory_knobs=False)
    with contextlib.ExitStack() as stack:
        PPORecipe(cfg, run, stack).train()
    return run.output_dir


class PPORecipe:
    """A PPO run's loop over the parts ``build_rl_run`` built, plus the critic it builds here.
    Closed by the caller's ExitStack."""

    def __init__(self, cfg: PPOConfig, run: RLRun, stack: contextlib.ExitStack) -> None:
        self.cfg, self.run = cfg, run
        self.model, self.tokenizer, self.reference = run.policy.model, run.policy.tokenizer, run.policy.reference
        self.engine, self.optimization, self.sampler, self.start_step = run.engine, run.optimization, run.sampler, run.start_step
        self.pad_token_id, self.autocast = self.tokenizer.pad_token_id, run.engine.autocast
        self.engine_metrics: dict[str, float] = {}  # the engine's counters for the last generation
        # The critic, with its own optimizer: the trainer section's AdamW settings and schedule, critic.lr.
        self.critic = build_critic(cfg.model, cfg.critic, self.model, run.device, run.resume_ckpt)
        self.optimizer_steps = cfg.trainer.max_steps * derived.optimizer_steps_per_step(cfg.algorithm, cfg.rollout,
                                                                                        cfg.trainer)
        critic_trainer = dataclasses.replace(cfg.trainer, lr=cfg.critic.lr)
        self.critic_optimizer = build_optimizer(self.critic, critic_trainer)
        self.critic_scheduler = build_scheduler(self.critic_optimizer, critic_trainer, self.optimizer_steps)
        if run.optimization.resumed_state is not None:
            load_critic_optimizer(run.resume_ckpt / CRITIC_SUBDIR, self.critic_optimizer, self.critic_scheduler,
                                  run.device)
            follow_schedule(self.critic_optimizer, self.critic_scheduler, cfg.critic.lr)
        self.group_size = cfg.rollout.group_size
        self.sampling, self.val_max_tokens = derived.rollout_sampling(cfg), derived.validation_max_new_tokens(cfg)

        self.rewards, outputs = open_rl_outputs(stack, cfg, run)
        self.metrics_log, self.sample_log, self.progress, self.guard = (outputs.metrics, outputs.samples,
                                                                        outputs.progress, outputs.guard)
        self.completed, self.sampler_state = self.start_step, self.sampler.state_dict()
        self.skipped_steps = SkippedStepGuard(cfg.trainer.max_skipped_steps)

    def train(self) -> None:
        cfg, start_step, progress = self.cfg, self.start_step, self.progress
        try:
            if cfg.validation.at_start and start_step == 0 and self.run.val_prompts:
                self.validate(0)
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                step_metrics, env_metrics = self.step(step)
                progress.update(step, {"reward": step_metrics["reward/mean"],
                                       **({"acc": env_metrics["accuracy"]} if "accuracy" in env_metrics else {})})
                if due(step, cfg.logging.console_every):
                    progress.write(format_console_line(step, cfg.trainer.max_steps, step_metrics))
                if due(step, cfg.validation.every, cfg.trainer.max_steps):
                    self.validate(step)
                if due(step, cfg.checkpoint.every, cfg.trainer.max_steps):
                    self.save_checkpoint()
            if cfg.validation.at_end and self.run.val_prompts and self.completed > start_step:
                self.validate(self.completed)
            self.save_checkpoint()
        except KeyboardInterrupt:
            save_on_interrupt(self.completed, start_step, self.save_checkpoint, progress.write)
            raise

    def step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One training step; returns its metrics and the environments' own (e.g. accuracy)."""
        cfg, algo, pad, device = self.cfg, self.cfg.algorithm, self.pad_token_id, self.run.device
        step_start = time.perf_counter()
        seed_everything(cfg.seed * 1_000_003 + step)  # sampling independent of the past: exact resume
        # The engine computes with the trainer's own modules: every token it samples comes from
        # the policy version (optimizer steps) this step starts from, and records it.
        policy_version = (step - 1) * self.optimizer_steps // cfg.trainer.max_steps
        self.engine.weight_version = policy_version

        # ---- rollouts and rewards
        rollouts, env_metrics = self.collect_rollouts()
        samples = [
            Sample(p.token_ids, c.token_ids, c.logprobs, 0.0, r, trainable=not (algo.mask_truncated and c.finish_reason == "length"),
                   routed_experts=getattr(c, "routed_experts", None))  # MoE: replayed with moe.router_replay
            for p, c, r in zip(rollouts.prompts, rollouts.completions, rollouts.shaped_rewards.tolist())
        ]

        # ---- reference logprobs, values, GAE
        warming_up = step <= cfg.critic.warmup_steps  # the critic alone learns: the policy is not updated
        mismatch_metrics, old_from_update = self.score(samples, warming_up)
        old_values = critic_values(self.critic, samples, cfg.critic.micro_batch_size or cfg.trainer.micro_batch_size,
                                   pad, device, self.autocast)
        targets = assign_gae_advantages(samples, rollouts.shaped_rewards, old_values, algo, cfg.critic)
        t_scored = time.perf_counter()

        # ---- policy update (not during critic warm-up) and critic update, and the metrics line.
        # Ctrl-C waits for all of it, so a checkpoint holds whole steps with their metrics lines.
        with self.guard.deferred():
            num_recorded = self.sample_log.num_to_record(step, cfg.trainer.max_steps, len(samples),
                                                         cfg.trainer.mini_batch_size, self.group_size)
            optimizer, scheduler = self.optimization.optimizer, self.optimization.scheduler
            # The lrs this step uses: read before the updates move their schedulers on.
            lr, critic_lr = optimizer.param_groups[0]["lr"], self.critic_optimizer.param_groups[0]["lr"]
            with self.progress.phase("training"):
                # No samples: policy_update leaves the policy alone and keeps its lr schedule on the step clock.
                update_metrics = policy_update(self.model, optimizer, scheduler, [] if warming_up else samples, pad,
                                               device, self.autocast, algo=algo, trainer=cfg.trainer,
                                               rollout=cfg.rollout, model_cfg=cfg.model, moe_cfg=cfg.moe,
                                               record_tokens=num_recorded, old_from_update=old_from_update)
                critic_metrics = critic_update(self.critic, self.critic_optimizer, self.critic_scheduler, samples,
                                               targets, cfg.critic, cfg.trainer, algo.ppo_epochs, pad, device,
                                               self.autocast)
            t_trained = time.perf_counter()

            num_response_tokens = sum(len(c.token_ids) for c in rollouts.completions)
            step_metrics = {
                **rollout_metrics(rollouts, env_metrics, self.group_size),
                **shaping_metrics(algo, rollouts, rollouts, samples, 1),
                **update_metrics,
                **mismatch_metrics,
                **self.engine_metrics,
                **targets.metrics,
                **critic_metrics,
                "critic/warmup": float(warming_up),
                "lr": lr,
                "critic/lr": critic_lr,
                **timing_metrics(rollouts, num_response_tokens, step_start, t_scored, t_trained),
                "data/epoch": float(self.sampler.epoch),
                **token_staleness_metrics(rollouts.completions, policy_version, policy_version),
            }
            self.metrics_log.log(step, step_metrics)
            if num_recorded:  # during critic warm-up without trainer logprobs and entropy
                self.sample_log.write_rollouts(step, rollouts, samples[:num_recorded], self.tokenizer, self.group_size,
                                               version=policy_version)
            # Broken when the critic's updates (or, after warm-up, the policy's) were all skipped.
            self.skipped_steps.record(step, math.isfinite(critic_metrics["critic/grad_norm"])
                                      and (warming_up or math.isfinite(update_metrics["grad_norm"])))
            self.completed, self.sampler_state = step, self.sampler.state_dict()
        return step_metrics, env_metrics

    def collect_rollouts(self) -> tuple[Rollouts, dict[str, float]]:
        """One round of scored completions and the environments' metrics of it."""
        with self.progress.phase("generating"):  # a CPU step takes minutes: say which part runs
            rollouts = generate_and_score(self.engine, self.rewards, self.sampler, self.run.train_prompts,
                                          self.sampling, self.cfg.rollout, self.cfg.algorithm, self.cfg.model.system_prompt)
        self.engine_metrics = engine_metrics(self.engine)  # before sleep() frees the scheduler
        self.engine.sleep()  # the KV cache's memory goes to the trainer until the next generation
        _, env_metrics = self.rewards.post_process({"rewards": rollouts.rewards, "metadata": rollouts.metadata,
                                                    "message_logs": rollouts.message_logs, "answers": rollouts.answers})
        return rollouts, env_metrics

    def score(self, samples: list[Sample], warming_up: bool) -> tuple[dict[str, float], bool]:
        """Fill the samples' reference logprobs (KL) and the trainer's old logprobs where the
        engine's are not the proximal policy. Returns the engine/trainer mismatch metrics, and
        whether the policy update's own forward pass gives the old logprobs instead (one optimizer
        step per step; not in the critic's warm-up, which makes no policy update)."""
        cfg, pad, device = self.cfg, self.pad_token_id, self.run.device
        if cfg.algorithm.kl_coef > 0:
            fill_reference_logprobs(self.reference if self.reference is not None else self.model, samples, cfg.trainer,
                                    cfg.rollout, cfg.model, pad, device, self.autocast)
        if resolved_off_policy_correction(cfg.algorithm).name != "none" or (
                cfg.rollout.recompute_logprobs and not getattr(self.engine, "logprobs_match_trainer", False)):
            steps = derived.optimizer_steps_per_step(cfg.algorithm, cfg.rollout, cfg.trainer)
            if not warming_up and old_logprobs_from_update(self.model, samples, steps):
                return {}, True
            return recompute_old_logprobs(self.model, samples, pad, device, self.autocast, trainer=cfg.trainer,
                                          rollout=cfg.rollout, model_cfg=cfg.model,
                                          router_replay=cfg.moe.router_replay), False
        return {}, False

    def validate(self, step: int) -> None:
        val_prompts, progress = self.run.val_prompts, self.progress
        progress.write(f"validation at step {step} ({len(val_prompts)} prompts, greedy)")
        val_records: list[dict] = []
        with progress.phase("validating", pause=True):  # between steps: not in the ETA's step rate
            val = validate(self.engine, self.rewards, val_prompts, max_tokens=self.val_max_tokens,
                           stop=list(self.cfg.rollout.stop), print_samples=self.cfg.validation.print_samples,
                           write=progress.write, records=val_records)
        self.metrics_log.log(step, val)
        self.sample_log.write_validation(step, val_records)
        progress.write("  " + "  ".join(f"{k}={v:.4g}" for k, v in val.items()))

    def save_checkpoint(self) -> None:
        save_optimizer = self.cfg.checkpoint.save_optimizer
        policy = PolicyWithCritic(self.model, self.critic, self.critic_optimizer, self.critic_scheduler, save_optimizer)
        self.optimization.save(self.completed, policy, self.tokenizer, {"sampler": self.sampler_state, "seed": self.cfg.seed},
                               save_optimizer=save_optimizer, progress=self.progress)


def build_critic(model_cfg: ModelConfig, critic_cfg: CriticConfig, policy: torch.nn.Module, device: torch.device,
                 resume_ckpt: Path | None) -> ValueModel:
    """The critic of a checkpoint when resuming; else a copy of the policy's starting weights
    (critic.path empty), or the transformer of critic.path, loaded as the policy's ``model_cfg``
    says. Always fully trained (no LoRA)."""
    if resume_ckpt is not None:
        return ValueModel.load(resume_ckpt / CRITIC_SUBDIR, device, model_cfg.attn_implementation)
    if not critic_cfg.path and not is_peft_model(policy):
        return ValueModel.from_causal_lm(policy)
    # A LoRA policy's modules hold adapters, so the critic loads the base weights afresh.
    critic_model = dataclasses.replace(model_cfg, path=critic_cfg.path or model_cfg.path,
                                       gguf_file="" if critic_cfg.path else model_cfg.gguf_file, lora=LoRAConfig())
    return ValueModel(load_model(model_source(critic_model), critic_model, device).base_model)


class PolicyWithCritic:
    """What the checkpoint manager saves as "the model": the policy in the checkpoint folder and
    the critic (with its optimizer and scheduler) in ``<ckpt>/critic/``, inside the same atomic write."""

    def __init__(self, policy, critic: ValueModel, optimizer, scheduler, save_optimizer: bool) -> None:
        self.policy, self.critic = policy, critic
        self.optimizer, self.scheduler, self.save_optimizer = optimizer, scheduler, save_optimizer

    def save_pretrained(self, folder: str | Path) -> None:
        self.policy.save_pretrained(folder)
        critic_dir = Path(folder) / CRITIC_SUBDIR
        self.critic.save(critic_dir)
        if self.save_optimizer:
            torch.save(self.optimizer.state_dict(), critic_dir / CRITIC_OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), critic_dir / CRITIC_SCHEDULER_FILE)


def load_critic_optimizer(critic_dir: Path, optimizer, scheduler, device) -> None:
    optimizer.load_state_dict(_torch_load(critic_dir / CRITIC_OPTIMIZER_FILE, device))
    scheduler.load_state_dict(_torch_load(critic_dir / CRITIC_SCHEDULER_FILE, device))


@torch.no_grad()
def critic_values(critic: ValueModel, samples: list[Sample], micro_batch_size: int, pad_token_id: int, device,
                  autocast) -> torch.Tensor:
    """``(N, W)`` values of every sample's response tokens (W: the longest response), 0 on padding, on CPU."""
    width = max([len(s.response_ids) for s in samples] + [1])
    out = torch.zeros((len(samples), width))
    critic.eval()
    row = 0
    for micro_batch in chunks(samples, micro_batch_size):
        batch = collate(micro_batch, pad_token_id, device)
        with autocast():
            values = critic(batch.tokens)
        values = (values.float() * batch.tokens.response_mask).cpu()
        out[row : row + len(micro_batch), : values.shape[1]] = values
        row += len(micro_batch)
    return out


@dataclasses.dataclass
class ValueTargets:
    """What the critic update regresses on: the values at sampling time and the GAE returns, ``(N, W)``."""

    old_values: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, float]


def assign_gae_advantages(samples: list[Sample], rewards: torch.Tensor, values: torch.Tensor,
                          algo: PPOAlgorithmConfig, critic_cfg: CriticConfig) -> ValueTargets:
    """Set every sample's per-token advantages (GAE with ``critic_cfg``'s gamma and lambda on
    rewards shaped by ``algo``'s KL, whitened if configured) and return the critic's targets.
    Untrainable samples get zero advantages and no value loss."""
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    width = values.shape[1]
    trainable = torch.tensor([s.trainable for s in samples])
    mask = (torch.arange(width) < lengths[:, None]) & trainable[:, None]
    token_kl = None
    if algo.kl_coef > 0:
        old = pad_rows([s.old_logprobs for s in samples], width, "cpu")
        ref = pad_rows([s.ref_logprobs for s in samples], width, "cpu")
        token_kl = kl_penalty(old, ref, algo.kl_estimator)
    token_rewards = rlhf_token_rewards(rewards, mask, token_kl, algo.kl_coef)
    advantages, returns = compute_gae(token_rewards, values, mask, gamma=critic_cfg.gamma, lam=critic_cfg.lam)
    raw = advantages[mask]
    metrics = {
        "critic/values_mean": masked_mean(values, mask),
        "critic/returns_mean": masked_mean(returns, mask),
        "critic/advantages_mean": raw.mean().item() if raw.numel() else 0.0,
        "critic/advantages_std": raw.std().item() if raw.numel() > 1 else 0.0,
        "critic/explained_variance": explained_variance(values, returns, mask),
    }
    if algo.whiten_advantages:
        advantages = normalize_advantages(advantages, mask)
    for s, row in zip(samples, advantages.tolist()):
        s.advantage = row[: len(s.response_ids)]
    return ValueTargets(values, returns, mask.float(), metrics)


def critic_update(
    critic: ValueModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples: list[Sample],
    targets: ValueTargets,
    critic_cfg: CriticConfig,
    trainer: TrainerConfig,
    ppo_epochs: int,
    pad_token_id: int,
    device: torch.device,
    autocast,
) -> dict[str, float]:
    """The policy update's loop for the critic: ``ppo_epochs`` x mini-batches (of ``trainer``) x
    micro-batches, each micro-batch's value loss normalised by its mini-batch's token count
    (token-mean), so accumulated gradients equal the mini-batch's whatever ``critic.micro_batch_size``
    is. Gradients are clipped at ``trainer.max_grad_norm``."""
    micro_size = critic_cfg.micro_batch_size or trainer.micro_batch_size
    indices = list(range(len(samples)))
    sums: dict[str, float] = {}
    num_tokens_total = 0.0
    losses, grad_norms = [], []
    critic.train()
    for _ in range(ppo_epochs):
        for mini_batch in chunks(indices, trainer.mini_batch_size):
            num_tokens = float(max(targets.mask[mini_batch].sum().item(), 1))
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for micro_batch in chunks(mini_batch, micro_size):
                batch = collate([samples[i] for i in micro_batch], pad_token_id, device)
                width = batch.tokens.response_len
                mask = targets.mask[micro_batch, :width].to(device)
                with autocast():
                    values = critic(batch.tokens)
                per_token, metrics = value_loss(
                    values, targets.old_values[micro_batch, :width].to(device), targets.returns[micro_batch, :width].to(device),
                    mask, clip_range=critic_cfg.value_clip,
                )
                loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=num_tokens, num_sequences=1.0, norm_length=1.0)
                loss.backward()
                loss_total += loss.item()
                micro_tokens = mask.sum().item()
                num_tokens_total += micro_tokens
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * micro_tokens
            max_norm = trainer.max_grad_norm if trainer.max_grad_norm > 0 else float("inf")
            grad_norm = float(clip_and_step(optimizer, critic.parameters(), max_norm))
            losses.append(loss_total)
            if math.isfinite(grad_norm):
                grad_norms.append(grad_norm)
            else:
                logger.warning("non-finite critic gradient norm; critic optimizer step skipped")
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    denom = max(num_tokens_total, 1.0)
    out = {f"critic/{k}": v / denom for k, v in sums.items() if k != "values_mean"}
    out["critic/value_loss"] = sum(losses) / len(losses)
    out["critic/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    return out
