"""The GRPO recipe. ``train`` builds the parts once (trainer/builder.py), then runs
``GRPORecipe.step`` per step: prompts -> a group of completions per prompt -> rewards (with dynamic
sampling: more rounds until enough groups are informative) -> reference and old logprobs ->
advantages -> policy update -> weights to the engine -> metrics; then validation and checkpoints.

Batches come from one of two sources, and the step is the same for both: the engine generates
them at the start of the step (``rollout.mode=sync``), or engine replicas generated them ahead
while the trainer trained (``rollout.mode=async``, bounded by ``rollout.max_staleness``)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

from posttrain.algorithms import get_advantage_estimator, resolved_off_policy_correction
from posttrain.checkpoint.manager import CheckpointManager
from posttrain.checkpoint.rng import seed_everything
from posttrain.cluster import build_replica_pool
from posttrain.config import derived
from posttrain.config.schema import GRPOConfig
from posttrain.distributed import (
    all_gather_objects,
    all_reduce_max,
    gathered_for_generation,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    mean_across_ranks,
)
from posttrain.logging.metrics import format_console_line
from posttrain.models.loading import autocast_context
from posttrain.models.lora import lora_enabled
from posttrain.sync import EngineClient, build_weight_sync
from posttrain.trainer.api_source import make_api_source
from posttrain.trainer.async_rollouts import (
    PENDING_ROLLOUTS_FILE,
    AsyncRollouts,
    PoolEngine,
    ReadyBatch,
    SerializedRewards,
    load_pending,
    save_pending,
    staleness_metrics,
    token_staleness_metrics,
)
from posttrain.trainer.builder import RLRun, build_rl_run, open_rl_outputs
from posttrain.trainer.common import SkippedStepGuard, due, save_on_interrupt
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import (
    Rollouts,
    assign_advantages,
    engine_metrics,
    fill_reference_logprobs,
    generate_and_score,
    needs_another_round,
    old_logprobs_from_update,
    recompute_old_logprobs,
    rollout_metrics,
    shaping_metrics,
    timing_metrics,
)
from posttrain.trainer.samples import Sample
from posttrain.trainer.validation import validate

logger = logging.getLogger("posttrain.trainer")


def train(cfg: GRPOConfig, resume_from: str | None = None) -> Path:
    """Run GRPO; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    run = build_rl_run(cfg, resume_from, "grpo")
    with contextlib.ExitStack() as stack:
        GRPORecipe(cfg, run, stack).train()
    return run.output_dir


class GRPORecipe:
    """A GRPO run's loop over the parts ``build_rl_run`` built. Closed by the caller's ExitStack."""

    def __init__(self, cfg: GRPOConfig, run: RLRun, stack: contextlib.ExitStack) -> None:
        self.cfg, self.run = cfg, run
        self.model, self.tokenizer, self.reference = run.policy.model, run.policy.tokenizer, run.policy.reference
        self.optimization, self.sampler, self.start_step = run.optimization, run.sampler, run.start_step
        # Engine replicas (async runs, or cluster.backend=process|ray) generate in the background on
        # their own copies of the policy; a synchronous run on them is their schedule with staleness 0.
        self.uses_replicas = derived.uses_engine_replicas(cfg)
        self.engine_metrics: dict[str, float] = {}  # the engine's counters for the last generation
        self.autocast = autocast_context(run.device, run.compute_dtype) if self.uses_replicas else run.engine.autocast
        self.group_size, self.target_groups = cfg.rollout.group_size, cfg.rollout.batch_size // cfg.rollout.group_size
        self.optimizer_steps_per_step = derived.optimizer_steps_per_step(cfg.algorithm, cfg.rollout, cfg.trainer)
        self.sampling, self.val_max_tokens = derived.rollout_sampling(cfg), derived.validation_max_new_tokens(cfg)
        self.estimator = get_advantage_estimator(cfg.algorithm.advantage)
        # rollout.source=api: remote environments generate and score; each step pulls their groups.
        self.api_source = (make_api_source(self.model, self.tokenizer, run.device, self.autocast, rollout=cfg.rollout,
                                           algo=cfg.algorithm, trainer=cfg.trainer, model_cfg=cfg.model,
                                           start_version=self.start_step) if cfg.rollout.source == "api" else None)
        self.main = is_main_process()  # rank 0 logs metrics and shows progress; the others stay quiet
        self.rewards, outputs = open_rl_outputs(stack, cfg, run)
        self.metrics_log, self.sample_log, self.progress, self.guard = (outputs.metrics, outputs.samples,
                                                                        outputs.progress, outputs.guard)
        self.engine = run.engine
        if self.uses_replicas:
            self._start_replicas(stack)
        else:
            # Policy versions count optimizer steps; the engine starts with the weights of start_step.
            r = cfg.rollout
            client = EngineClient(r.base_url, r.api_key, r.request_timeout_s) if r.backend == "openai" else None
            self.weight_sync = build_weight_sync(cfg.sync, self.model, self.engine, rollout_backend=r.backend,
                                                 lora=lora_enabled(cfg.model), client=client,
                                                 start_version=self.start_step * self.optimizer_steps_per_step)
            stack.callback(self.weight_sync.close)
        self.completed, self.sampler_state = self.start_step, self.sampler.state_dict()
        self.skipped_steps = SkippedStepGuard(cfg.trainer.max_skipped_steps)

    def _start_replicas(self, stack: contextlib.ExitStack) -> None:
        """Engine replicas on their own copies of the policy generate while this process trains.
        Policy versions count steps here; the replicas start with the weights of start_step."""
        cfg = self.cfg
        pending: list[ReadyBatch] = []  # batches generated before the checkpoint, not trained yet
        if self.optimization.resumed_state is not None:
            pending = load_pending(CheckpointManager.load_extra(self.run.resume_ckpt, PENDING_ROLLOUTS_FILE),
                                   self.start_step)
        self.rewards = SerializedRewards(self.rewards)  # the producer thread scores while validation may too
        self.pool = build_replica_pool(cfg, self.model, self.tokenizer, self.run.compute_dtype,
                                       start_version=self.start_step)
        stack.callback(self.pool.close)
        self.engine = PoolEngine(self.pool, self.tokenizer)  # validation's view of the replicas
        producer_engine = PoolEngine(self.pool, self.tokenizer)

        def make_batch(step: int) -> list[Rollouts]:
            rounds: list[Rollouts] = []
            while not rounds or needs_another_round(rounds, cfg.algorithm, cfg.rollout):
                producer_engine.seed = self.step_seed(step) + 104_729 * len(rounds)
                rounds.append(generate_and_score(producer_engine, self.rewards, self.sampler, self.run.train_prompts,
                                                 self.sampling, cfg.rollout, cfg.algorithm, cfg.model.system_prompt))
            return rounds

        self.producer = AsyncRollouts(
            make_batch, self.sampler, first_step=self.start_step + 1, last_step=cfg.trainer.max_steps,
            published_version=self.start_step, max_staleness=derived.replica_max_staleness(cfg),
            timeout_s=cfg.cluster.wait_timeout_s, ready=pending,
            describe_source=lambda: f"{self.pool.num_replicas} engine replica(s) (cluster.backend={cfg.cluster.backend})",
        )
        stack.callback(self.producer.close)

    def step_seed(self, step: int) -> int:  # the same per step in sync and async runs: K=0 reproduces sync
        return self.cfg.seed * 1_000_003 + step + 7919 * get_rank()

    def train(self) -> None:
        cfg, start_step, progress = self.cfg, self.start_step, self.progress
        try:
            if self.uses_replicas:
                self.producer.start()
            else:
                self.weight_sync.start(start_step * self.optimizer_steps_per_step, resumed=self.run.resumed,
                                       step=start_step)
            if cfg.validation.at_start and start_step == 0 and self.run.val_prompts:
                self.validate(0)
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                step_metrics, env_metrics = self.step(step)
                progress.update(step, {"reward": step_metrics["reward/mean"],
                                       **({"acc": env_metrics["accuracy"]} if "accuracy" in env_metrics else {})})
                if self.main and due(step, cfg.logging.console_every):
                    progress.write(format_console_line(step, cfg.trainer.max_steps, step_metrics))
                if due(step, cfg.validation.every, cfg.trainer.max_steps):
                    self.validate(step)
                if due(step, cfg.checkpoint.every, cfg.trainer.max_steps):
                    self.save_checkpoint()
                if is_distributed() and all_reduce_max(float(self.guard.pending)):
                    raise self.guard.interrupt()  # Ctrl-C/SIGTERM on any rank: all stop after this same whole step
            if cfg.validation.at_end and self.run.val_prompts and self.completed > start_step:
                self.validate(self.completed)
            self.save_checkpoint()
        except KeyboardInterrupt:
            save_on_interrupt(self.completed, start_step, lambda: self.save_checkpoint(interrupted=True), progress.write)
            raise

    def step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One training step; returns its metrics and the environments' own (e.g. accuracy)."""
        cfg, algo = self.cfg, self.cfg.algorithm
        step_start = time.perf_counter()
        ready, rounds = self.collect_rollouts(step)  # ready: the async producer's batch, None in sync runs
        wait_s = time.perf_counter() - step_start if ready is not None else None
        rollouts = Rollouts.concat(rounds)  # everything generated: the step's reward metrics
        batch = rollouts.keep_informative_groups(self.group_size, self.target_groups) if algo.dynamic_sampling else rollouts
        # Metrics cover every rank's completions; the batch trained on here is this rank's.
        all_rollouts = Rollouts.concat(all_gather_objects(rollouts)) if is_distributed() else rollouts
        env_metrics = self.environment_metrics(all_rollouts)

        # ---- reference and old logprobs, advantages of the completions trained on
        samples = training_samples(batch, algo.mask_truncated)
        mismatch_metrics, old_from_update = self.score(samples, batch)
        t_scored = time.perf_counter()
        if not samples:
            logger.warning("step %d: no group with differing rewards after %d sampling rounds; update skipped", step, len(rounds))

        # ---- policy update, weights out and the metrics line. Ctrl-C waits for all of it, so a
        # checkpoint holds whole steps and every checkpointed step has its line in metrics.jsonl.
        num_recorded = self.sample_log.num_to_record(
            step, cfg.trainer.max_steps, len(samples), cfg.trainer.mini_batch_size // get_world_size(), self.group_size,
        ) if self.main else 0  # samples.jsonl: the trainer logprobs and entropy of rank 0's first samples
        engine_version = ready.admitted_version if ready is not None else self.weight_sync.engine_version
        with self.guard.deferred():
            lr = self.optimization.optimizer.param_groups[0]["lr"]  # the lr this step uses (updates move the scheduler on)
            with self.progress.phase("training"):
                update_metrics = policy_update(self.model, self.optimization.optimizer, self.optimization.scheduler,
                                               samples, self.tokenizer.pad_token_id, self.run.device, self.autocast,
                                               algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout,
                                               model_cfg=cfg.model, moe_cfg=cfg.moe, record_tokens=num_recorded,
                                               old_from_update=old_from_update)
            t_trained = time.perf_counter()
            sync_metrics = self.publish_weights(step, ready, batch, rollouts, engine_version, wait_s)
            num_response_tokens = sum(len(c.token_ids) for c in all_rollouts.completions)
            step_metrics = mean_across_ranks({  # per-rank ones (times, fractions): their mean
                **rollout_metrics(all_rollouts, env_metrics, self.group_size),
                **shaping_metrics(algo, rollouts, batch, samples, len(rounds)),
                **update_metrics, **mismatch_metrics, **(self.engine_metrics if ready is None else {}),
                **(self.api_source.step_metrics() if self.api_source is not None else {}),
                **sync_metrics, "lr": lr,
                **timing_metrics(rollouts, num_response_tokens, step_start, t_scored, t_trained, wait_s),
                "data/epoch": float(self.sampler.epoch),
            })
            if self.main:
                self.metrics_log.log(step, step_metrics)
                if num_recorded:
                    self.sample_log.write_rollouts(step, batch, samples[:num_recorded], self.tokenizer, self.group_size,
                                                   version=(step - 1) * self.optimizer_steps_per_step,
                                                   engine_version=engine_version)
            if samples:  # grad_norm is NaN when every optimizer update of the step was skipped
                self.skipped_steps.record(step, math.isfinite(update_metrics["grad_norm"]))
            self.completed, self.sampler_state = step, (ready.sampler_state if ready is not None else self.sampler.state_dict())
            if self.api_source is not None:  # acknowledge the step's groups, post the new policy version
                self.api_source.finish_step(step)
        return step_metrics, env_metrics

    def collect_rollouts(self, step: int) -> tuple[ReadyBatch | None, list[Rollouts]]:
        """The step's scored rounds. Dynamic sampling (DAPO) drops groups whose rewards are all
        equal and draws more rounds of prompts to refill the batch."""
        if self.uses_replicas:  # generated by the replicas' producer (which seeds each batch as below)
            with self.progress.phase("waiting for rollouts"):
                ready = self.producer.get(step)
            return ready, ready.rounds
        seed_everything(self.step_seed(step))  # sampling independent of anything before: resume is exact
        self.weight_sync.before_rollout((step - 1) * self.optimizer_steps_per_step, step)  # a restarted engine re-syncs
        # A CPU step takes minutes: the bar says which part runs. FSDP: ranks generate different
        # lengths, without collectives.
        with self.progress.phase("generating"), gathered_for_generation(self.model):
            rounds = [self.next_round()]
            while needs_another_round(rounds, self.cfg.algorithm, self.cfg.rollout):
                rounds.append(self.next_round())
        self.engine_metrics = engine_metrics(self.engine)  # before sleep() frees the scheduler
        self.engine.sleep()  # the KV cache's memory goes to the trainer until the next generation
        return None, rounds

    def next_round(self) -> Rollouts:
        if self.api_source is not None:
            return self.api_source.pull(self.target_groups)
        cfg = self.cfg
        return generate_and_score(self.engine, self.rewards, self.sampler, self.run.train_prompts, self.sampling,
                                  cfg.rollout, cfg.algorithm, cfg.model.system_prompt)

    def environment_metrics(self, rollouts: Rollouts) -> dict[str, float]:
        if self.api_source is not None:  # remote environments scored these groups
            return {}
        _, metrics = self.rewards.post_process({"rewards": rollouts.rewards, "metadata": rollouts.metadata,
                                                "message_logs": rollouts.message_logs, "answers": rollouts.answers})
        return metrics

    def score(self, samples: list[Sample], batch: Rollouts) -> tuple[dict[str, float], bool]:
        """Fill the samples' reference logprobs (KL), the trainer's old logprobs where the engine's
        are not the proximal policy, and advantages. Returns the engine/trainer mismatch metrics,
        and whether the update's own forward pass gives the trainer's old logprobs instead (one
        optimizer step per step: the pass before it would compute the same numbers)."""
        cfg, pad, device = self.cfg, self.tokenizer.pad_token_id, self.run.device
        if cfg.algorithm.kl_coef > 0:
            fill_reference_logprobs(self.reference if self.reference is not None else self.model, samples, cfg.trainer,
                                    cfg.rollout, cfg.model, pad, device, self.autocast)
        mismatch_metrics, old_from_update = {}, False
        # Replicas: the trainer's logprobs are the proximal policy of the ratio; the engine's the behaviour one.
        if self.uses_replicas or resolved_off_policy_correction(cfg.algorithm).name != "none" or (
                cfg.rollout.recompute_logprobs and not getattr(self.engine, "logprobs_match_trainer", False)):
            old_from_update = old_logprobs_from_update(self.model, samples, self.optimizer_steps_per_step)
            if not old_from_update:
                mismatch_metrics = recompute_old_logprobs(self.model, samples, pad, device, self.autocast,
                                                          trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                                                          router_replay=cfg.moe.router_replay)
        assign_advantages(self.estimator, samples, batch.shaped_rewards, cfg.algorithm, self.group_size)
        return mismatch_metrics, old_from_update

    def publish_weights(self, step: int, ready: ReadyBatch | None, batch: Rollouts, rollouts: Rollouts,
                        engine_version: int, wait_s: float | None) -> dict[str, float]:
        """The new weights to the engine (when the cadence says so) or to the replicas (every step,
        as policy version ``step``); returns the sync/* and staleness metrics."""
        if ready is not None:
            metrics = {**self.pool.push_weights(self.model, step), **self.pool.metrics(),
                       "time/wait_rollouts": wait_s,
                       **staleness_metrics(ready, batch, rollouts, policy_version=step - 1)}
            self.producer.publish(step)
            return metrics
        # Versions count optimizer steps here: the batch is trained from version
        # (step - 1) * optimizer_steps_per_step; its tokens carry the engine's.
        per_step = self.optimizer_steps_per_step
        return {**token_staleness_metrics(rollouts.completions, (step - 1) * per_step, engine_version),
                **self.weight_sync.after_update(step * per_step, step)}

    def validate(self, step: int) -> None:
        # Rank 0 validates alone, with the gathered weights; the others wait in the next collective.
        with gathered_for_generation(self.model):
            if not self.main:
                return
            val_prompts, progress = self.run.val_prompts, self.progress
            progress.write(f"validation at step {step} ({len(val_prompts)} prompts, greedy)")
            val_records: list[dict] = []
            with progress.phase("validating", pause=True):  # between steps: not in the ETA's step rate
                val = validate(
                    self.engine, self.rewards, val_prompts, max_tokens=self.val_max_tokens, stop=list(self.cfg.rollout.stop),
                    print_samples=self.cfg.validation.print_samples, write=progress.write, records=val_records,
                )
        self.metrics_log.log(step, val)
        self.sample_log.write_validation(step, val_records)
        self.progress.write("  " + "  ".join(f"{k}={v:.4g}" for k, v in val.items()))

    def save_checkpoint(self, interrupted: bool = False) -> None:
        resume_sampler, extra = self.sampler_state, None
        if self.uses_replicas:  # finished batches not trained yet survive; after Ctrl-C running ones are re-queued
            resume_sampler, ready = self.producer.pending_state(self.sampler_state, wait=not interrupted)
            extra = {PENDING_ROLLOUTS_FILE: save_pending(ready)}
        self.optimization.save(self.completed, self.model, self.tokenizer, {"sampler": resume_sampler, "seed": self.cfg.seed},
                               save_optimizer=self.cfg.checkpoint.save_optimizer, progress=self.progress, extra_files=extra)


def training_samples(batch: Rollouts, mask_truncated: bool) -> list[Sample]:
    """One Sample per completion of ``batch``, with its shaped reward; a truncated completion is
    not trained on with ``mask_truncated``; multi-turn observation tokens carry mask 0; an MoE
    completion from posttrain's engine carries its routes (moe.router_replay replays them)."""
    return [
        Sample(p.token_ids, c.token_ids, c.logprobs, 0.0, r, trainable=not (mask_truncated and c.finish_reason == "length"),
               response_mask=getattr(c, "trainable_mask", None),  # multi-turn: observation tokens 0
               routed_experts=getattr(c, "routed_experts", None))  # MoE: the engine's routes, for router replay
        for p, c, r in zip(batch.prompts, batch.completions, batch.shaped_rewards.tolist())
    ]
