"""The GRPO recipe. Read ``train`` top to bottom: build the parts, then per step
sample prompts -> generate a group per prompt -> score (with dynamic sampling: more rounds until
enough groups are informative) -> reference logprobs -> advantages -> policy update -> log,
validate, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

from posttrain.algorithms import get_advantage_estimator, resolved_off_policy_correction
from posttrain.checkpoint.manager import CheckpointManager
from posttrain.checkpoint.rng import seed_everything
from posttrain.checkpoint.sharded import is_sharded_checkpoint
from posttrain.cluster import build_replica_pool
from posttrain.config import derived
from posttrain.config.schema import GRPOConfig
from posttrain.data.sampler import EpochSampler
from posttrain.distributed import (
    RankShardedSampler,
    all_gather_objects,
    all_reduce_max,
    gathered_for_generation,
    get_rank,
    get_world_size,
    init_process_group,
    is_distributed,
    is_main_process,
    mean_across_ranks,
)
from posttrain.distributed.layout import ParallelLayout
from posttrain.envs.registry import env_specs, resolve_env_classes
from posttrain.envs.reward_pool import RewardPool
from posttrain.logging.metrics import format_console_line
from posttrain.models import load_model_and_tokenizer, make_reference_model, resolve_compute_dtype, resolve_device
from posttrain.models.loading import autocast_context
from posttrain.models.lora import is_peft_model
from posttrain.models.moe import check_moe_config, moe_checklist, prepare_moe_policy
from posttrain.rollout.builder import build_engine
from posttrain.sync import build_weight_sync
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
from posttrain.trainer.common import SkippedStepGuard, due, save_on_interrupt, start_run
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.samples import Sample
from posttrain.trainer.setup import build_optimization, encode_rl_prompts, load_rl_prompt_data, open_run_outputs
from posttrain.trainer.validation import validate

logger = logging.getLogger("posttrain.trainer")
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import (
    Rollouts,
    assign_advantages,
    fill_reference_logprobs,
    generate_and_score,
    needs_another_round,
    recompute_old_logprobs,
    rollout_metrics,
    shaping_metrics,
    timing_metrics,
)


def train(cfg: GRPOConfig, resume_from: str | None = None) -> Path:
    """Run GRPO; returns the run folder. ``resume_from``: a checkpoint or run folder."""
    # Cheap checks first, so a bad environment fails before anything is loaded or written.
    env_classes = resolve_env_classes(env_specs(cfg.env.cls, cfg.env.kwargs, cfg.env.tasks))  # task -> class
    # Under torchrun: join the process group (this rank's device); each rank then holds a shard of
    # every model (FSDP2) and generates, scores and trains on its share of each step's prompt groups.
    device = init_process_group(resolve_device(cfg.model.device), cfg.trainer.dist_timeout_s)
    check_moe_config(cfg, device)  # e.g. moe.expert_dtype=fp8 on a GPU without fp8
    output_dir, resume_ckpt = start_run(cfg, resume_from, "grpo")

    # ---- build the parts. Data first: rows the environment cannot score (e.g. no reference
    # answer) fail here, before the model loads, not as all-zero rewards at step 1.
    train_examples, val_examples = load_rl_prompt_data(cfg, env_classes)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, device)
    if device.type == "cpu" and cfg.rollout.batch_size * cfg.rollout.max_new_tokens >= 8192:
        logger.warning(
            "Training on CPU: each step generates %d completions of up to %d tokens and takes minutes. "
            "For a quick look use `--config cpu_quick`.", cfg.rollout.batch_size, cfg.rollout.max_new_tokens,
        )
    # A sharded checkpoint (multi-process runs) is loaded into the sharded model further down.
    sharded_resume = resume_ckpt is not None and is_sharded_checkpoint(resume_ckpt)

    def load_policy(source: str | None = None):
        # moe.random_init builds a random MoE policy; an MoE policy is checked and its router dtype set.
        policy, policy_tokenizer = load_model_and_tokenizer(cfg.model, device, source=source, moe=cfg.moe)
        return policy, policy_tokenizer, prepare_moe_policy(policy, cfg)

    model, tokenizer, moe_shape = load_policy(str(resume_ckpt) if resume_ckpt and not sharded_resume else None)
    reference = None
    # LoRA: the reference is the policy itself with its adapters disabled (the frozen base), no copy.
    if cfg.algorithm.kl_coef > 0 and not is_peft_model(model):
        # The reference is always the starting model, also when resuming from a later checkpoint.
        reference = make_reference_model(
            model if resume_ckpt is None or sharded_resume else load_policy()[0]
        )
        prepare_for_training(reference, cfg.trainer, device, compute_dtype)
    model = prepare_for_training(model, cfg.trainer, device, compute_dtype)  # before the optimizer sees it
    train_prompts, val_prompts = encode_rl_prompts(cfg, tokenizer, train_examples, val_examples)
    asynchronous = cfg.rollout.mode == "async"
    # async: engine replicas on their own copies of the policy generate while this process trains.
    engine = None if asynchronous else build_engine(cfg, model, tokenizer, compute_dtype)
    autocast = autocast_context(device, compute_dtype) if asynchronous else engine.autocast
    if moe_shape is not None:  # the layout and router checklist, before anything trains
        logger.info(moe_checklist(moe_shape, cfg, ParallelLayout.from_world_size(get_world_size()), type(model).__name__))
    group_size = cfg.rollout.group_size

    def step_seed(step: int) -> int:  # the same per step in sync and async runs: K=0 reproduces sync
        return cfg.seed * 1_000_003 + step + 7919 * get_rank()
    sampler = EpochSampler(len(train_prompts), cfg.rollout.batch_size // group_size, cfg.seed, cfg.data.shuffle)
    if is_distributed():  # each rank: its share of every mini-batch's prompt groups
        sampler = RankShardedSampler(sampler, prompts_per_mini_batch=cfg.trainer.mini_batch_size // group_size)
    optimizer_steps_per_step = derived.optimizer_steps_per_step(cfg)
    optimization = build_optimization(model, cfg.trainer, cfg.checkpoint.keep_last, output_dir,
                                      cfg.trainer.max_steps * optimizer_steps_per_step, resume_ckpt)
    optimizer, scheduler, start_step = optimization.optimizer, optimization.scheduler, optimization.start_step
    pending: list[ReadyBatch] = []  # async: batches generated before the checkpoint, not trained yet
    if optimization.resumed_state is not None:
        sampler.load_state_dict(optimization.resumed_state["sampler"])
        if asynchronous:
            pending = load_pending(CheckpointManager.load_extra(resume_ckpt, PENDING_ROLLOUTS_FILE), start_step)
    sampling = derived.rollout_sampling(cfg)
    algo = cfg.algorithm
    estimator = get_advantage_estimator(algo.advantage)
    target_groups = cfg.rollout.batch_size // group_size
    # rollout.source=api: remote environments generate and score; each step pulls their groups.
    api_source = (make_api_source(cfg, model, tokenizer, device, autocast, start_version=start_step)
                  if cfg.rollout.source == "api" else None)
    val_max_tokens = derived.validation_max_new_tokens(cfg)

    with contextlib.ExitStack() as stack:
        rewards = stack.enter_context(RewardPool(cfg.env.cls, cfg.env.kwargs, cfg.env.num_workers, cfg.env.timeout_s, tasks=cfg.env.tasks))
        main = is_main_process()  # rank 0 logs metrics and shows progress; the others stay quiet
        outputs = open_run_outputs(stack, output_dir, cfg, cfg.trainer.max_steps, start_step,
                                   resumed=resume_ckpt is not None, rollout_samples=True)
        metrics_log, sample_log, progress, guard = outputs.metrics, outputs.samples, outputs.progress, outputs.guard
        if asynchronous:
            # Policy versions count steps here; the replicas start with the weights of start_step.
            rewards = SerializedRewards(rewards)  # the producer thread scores while validation may too
            pool = build_replica_pool(cfg, model, tokenizer, compute_dtype, start_version=start_step)
            stack.callback(pool.close)
            engine = PoolEngine(pool, tokenizer)  # validation's view of the replicas
            producer_engine = PoolEngine(pool, tokenizer)

            def make_batch(step: int) -> list[Rollouts]:
                rounds: list[Rollouts] = []
                while not rounds or needs_another_round(rounds, cfg):
                    producer_engine.seed = step_seed(step) + 104_729 * len(rounds)
                    rounds.append(generate_and_score(producer_engine, rewards, sampler, train_prompts, sampling, cfg))
                return rounds

            producer = AsyncRollouts(
                make_batch, sampler, first_step=start_step + 1, last_step=cfg.trainer.max_steps,
                published_version=start_step, max_staleness=cfg.rollout.max_staleness, timeout_s=cfg.cluster.wait_timeout_s,
                describe_source=lambda: f"{pool.num_replicas} engine replica(s) (cluster.backend={cfg.cluster.backend})",
                ready=pending,
            )
            stack.callback(producer.close)
        else:
            if hasattr(engine, "close"):
                stack.callback(engine.close)
            # Policy versions count optimizer steps; the engine starts with the weights of start_step.
            weight_sync = build_weight_sync(cfg, model, engine, start_version=start_step * optimizer_steps_per_step)
            stack.callback(weight_sync.close)

        def next_round() -> Rollouts:
            if api_source is not None:
                return api_source.pull(target_groups)
            return generate_and_score(engine, rewards, sampler, train_prompts, sampling, cfg)

        def run_validation(step: int) -> None:
            # Rank 0 validates alone, with the gathered weights; the others wait in the next collective.
            with gathered_for_generation(model):
                if not main:
                    return
                progress.write(f"validation at step {step} ({len(val_prompts)} prompts, greedy)")
                val_records: list[dict] = []
                with progress.phase("validating", pause=True):  # between steps: not in the ETA's step rate
                    val = validate(
                        engine, rewards, val_prompts, max_tokens=val_max_tokens, stop=list(cfg.rollout.stop),
                        print_samples=cfg.validation.print_samples, write=progress.write, records=val_records,
                    )
            metrics_log.log(step, val)
            sample_log.write_validation(step, val_records)
            progress.write("  " + "  ".join(f"{k}={v:.4g}" for k, v in val.items()))

        completed = start_step
        sampler_state = sampler.state_dict()
        skipped_steps = SkippedStepGuard(cfg.trainer.max_skipped_steps)

        def save_checkpoint(interrupted: bool = False) -> None:
            resume_sampler, extra = sampler_state, None
            if asynchronous:  # finished batches not trained yet survive; after Ctrl-C running ones are re-queued
                resume_sampler, ready = producer.pending_state(sampler_state, wait=not interrupted)
                extra = {PENDING_ROLLOUTS_FILE: save_pending(ready)}
            optimization.save(completed, model, tokenizer, {"sampler": resume_sampler, "seed": cfg.seed},
                              save_optimizer=cfg.checkpoint.save_optimizer, progress=progress, extra_files=extra)

        try:
            if asynchronous:
                producer.start()
            else:
                weight_sync.start(start_step * optimizer_steps_per_step, resumed=resume_ckpt is not None, step=start_step)
            if cfg.validation.at_start and start_step == 0 and val_prompts:
                run_validation(0)
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                step_start = time.perf_counter()
                # ---- rollouts and rewards (worker processes). Dynamic sampling (DAPO) drops groups
                # whose rewards are all equal and draws more rounds of prompts to refill the batch.
                if asynchronous:  # generated ahead by the producer (which seeds each batch as below)
                    with progress.phase("waiting for rollouts"):
                        ready = producer.get(step)
                    rounds, wait_s = ready.rounds, time.perf_counter() - step_start
                else:
                    # Seeding per step makes sampling independent of anything before: resume is exact.
                    seed_everything(step_seed(step))
                    weight_sync.before_rollout((step - 1) * optimizer_steps_per_step, step)  # a restarted engine re-syncs
                    # A CPU step takes minutes: the bar says which part runs. FSDP: ranks generate
                    # different lengths, without collectives.
                    with progress.phase("generating"), gathered_for_generation(model):
                        rounds = [next_round()]
                        while needs_another_round(rounds, cfg):
                            rounds.append(next_round())
                    engine.sleep()  # the KV cache's memory goes to the trainer until the next generation
                rollouts = Rollouts.concat(rounds)  # everything generated: the step's reward metrics
                batch = rollouts.keep_informative_groups(group_size, target_groups) if algo.dynamic_sampling else rollouts
                # Metrics cover every rank's completions; the batch trained on here is this rank's.
                all_rollouts = Rollouts.concat(all_gather_objects(rollouts)) if is_distributed() else rollouts
                _, env_metrics = rewards.post_process(
                    {"rewards": all_rollouts.rewards, "metadata": all_rollouts.metadata, "message_logs": all_rollouts.message_logs, "answers": all_rollouts.answers}
                ) if api_source is None else (None, {})  # remote environments scored these groups

                # ---- reference logprobs and advantages of the completions trained on
                samples = [
                    Sample(p.token_ids, c.token_ids, c.logprobs, 0.0, r, trainable=not (algo.mask_truncated and c.finish_reason == "length"),
                           response_mask=getattr(c, "trainable_mask", None))  # multi-turn: observation tokens 0
                    for p, c, r in zip(batch.prompts, batch.completions, batch.shaped_rewards.tolist())
                ]
                if cfg.algorithm.kl_coef > 0:
                    fill_reference_logprobs(reference if reference is not None else model, samples, cfg, tokenizer.pad_token_id, device, autocast)
                mismatch_metrics = {}
                # async: the trainer's logprobs are the proximal policy of the ratio; the engine's the behaviour one.
                if asynchronous or resolved_off_policy_correction(cfg.algorithm).name != "none" or (cfg.rollout.recompute_logprobs and not getattr(engine, "logprobs_match_trainer", False)):
                    mismatch_metrics = recompute_old_logprobs(model, samples, cfg, tokenizer.pad_token_id, device, autocast)
                assign_advantages(estimator, samples, batch.shaped_rewards, cfg)
                t_scored = time.perf_counter()
                if not samples:
                    logger.warning("step %d: no group with differing rewards after %d sampling rounds; update skipped", step, len(rounds))

                # ---- policy update and its metrics line. Ctrl-C waits for both, so a checkpoint
                # holds whole steps and every checkpointed step has its line in metrics.jsonl.
                # samples.jsonl: rank 0 records the trainer logprobs and entropy of its first samples.
                num_recorded = sample_log.num_to_record(
                    step, cfg.trainer.max_steps, len(samples), cfg.trainer.mini_batch_size // get_world_size(), group_size,
                ) if main else 0
                engine_version = ready.admitted_version if asynchronous else weight_sync.engine_version
                with guard.deferred():
                    lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the updates move the scheduler on)
                    with progress.phase("training"):
                        update_metrics = policy_update(model, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id,
                                                       device, autocast, record_tokens=num_recorded)
                    t_trained = time.perf_counter()
                    if asynchronous:  # every step's weights go out as policy version `step`
                        sync_metrics = {**pool.push_weights(model, step), **pool.metrics(), "time/wait_rollouts": wait_s,
                                        **staleness_metrics(ready, batch, rollouts, policy_version=step - 1)}
                        producer.publish(step)
                    else:  # the cadence decides whether the engine gets the new weights now (sync/* metrics)
                        # Versions count optimizer steps here: the batch is trained from version
                        # (step - 1) * optimizer_steps_per_step; its tokens carry the engine's.
                        sync_metrics = {**token_staleness_metrics(rollouts.completions, (step - 1) * optimizer_steps_per_step,
                                                                  engine_version),
                                        **weight_sync.after_update(step * optimizer_steps_per_step, step)}

                    # ---- metrics
                    num_response_tokens = sum(len(c.token_ids) for c in all_rollouts.completions)
                    step_metrics = {
                        **rollout_metrics(all_rollouts, env_metrics, group_size),
                        **shaping_metrics(cfg, rollouts, batch, samples, len(rounds), group_size),
                        **update_metrics,
                        **mismatch_metrics,
                        **(api_source.step_metrics() if api_source is not None else {}),
                        **sync_metrics,
                        "lr": lr,
                        **timing_metrics(rollouts, num_response_tokens, step_start, t_scored, t_trained, wait_s if asynchronous else None),
                        "data/epoch": float(sampler.epoch),
                    }
                    step_metrics = mean_across_ranks(step_metrics)  # per-rank ones (times, fractions): their mean
                    if main:
                        metrics_log.log(step, step_metrics)
                        if num_recorded:
                            sample_log.write_rollouts(step, batch, samples[:num_recorded], tokenizer, group_size,
                                                      version=(step - 1) * optimizer_steps_per_step, engine_version=engine_version)
                    if samples:  # grad_norm is NaN when every optimizer update of the step was skipped
                        skipped_steps.record(step, math.isfinite(update_metrics["grad_norm"]))
                    completed, sampler_state = step, (ready.sampler_state if asynchronous else sampler.state_dict())
                    if api_source is not None:  # acknowledge the step's groups, post the new policy version
                        api_source.finish_step(step)

                progress.update(step, {"reward": step_metrics["reward/mean"], **({"acc": env_metrics["accuracy"]} if "accuracy" in env_metrics else {})})
                if main and due(step, cfg.logging.console_every):
                    progress.write(format_console_line(step, cfg.trainer.max_steps, step_metrics))

                if due(step, cfg.validation.every, cfg.trainer.max_steps):
                    run_validation(step)
                if due(step, cfg.checkpoint.every, cfg.trainer.max_steps):
                    save_checkpoint()
                if is_distributed() and all_reduce_max(float(guard.pending)):
                    raise guard.interrupt()  # Ctrl-C/SIGTERM on any rank: all stop after this same whole step

            if cfg.validation.at_end and val_prompts and completed > start_step:
                run_validation(completed)
            save_checkpoint()
        except KeyboardInterrupt:
            save_on_interrupt(completed, start_step, lambda: save_checkpoint(interrupted=True), progress.write)
            raise
    return output_dir
