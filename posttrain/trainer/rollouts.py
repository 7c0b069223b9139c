"""The rollout side of a policy-gradient step: generate and score completions, turn rewards into
per-token advantages, reference and old logprobs, and the rollout metrics. Shared by GRPO and PPO."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.algorithms import folds_kl_into_reward, informative_groups, kl_penalty, overlong_penalty
from posttrain.config.algorithm_schema import AlgorithmConfig
from posttrain.config.rollout_schema import RolloutConfig
from posttrain.config.schema import ModelConfig, TrainerConfig
from posttrain.data.sampler import EpochSampler
from posttrain.envs.reward_pool import RewardPool
from posttrain.data.chat import TokenizedPrompt
from posttrain.models import response_logprobs
from posttrain.models.lora import adapters_disabled
from posttrain.models.moe import RouteAgreement, router_token_index
from posttrain.models.moe.hf_blocks import GroupedMoE
from posttrain.sampling import SamplingParams
from posttrain.rollout.episodes import Episode, episode_metrics, run_episodes
from posttrain.rollout.hf_engine import HFEngine
from posttrain.trainer.packing import packed_row_tokens, packs_samples, split_micro_batches
from posttrain.trainer.samples import (
    Sample,
    collate,
    grouped_moe_for_routes,
    logprob_mismatch_metrics,
    pad_rows,
    token_masks,
)
from posttrain.trainer.validation import per_task_means

logger = logging.getLogger("posttrain.trainer")


@dataclass
class Rollouts:
    """Scored completions of one or more generation rounds, in groups of ``group_size`` rows."""

    prompts: list[Any]  # EncodedPrompt per completion
    completions: list[Any]  # posttrain.sampling.Completion
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


def assign_advantages(estimator: Callable, samples: list[Sample], rewards: torch.Tensor, algo: AlgorithmConfig,
                      group_size: int) -> None:
    """Set every sample's per-token advantages from ``rewards`` (N,), group-contiguous (``group_size`` rows a group).

    Every estimator gets the same arguments (see posttrain.algorithms.advantages). The response
    mask is the *loss* mask, so untrainable samples (truncated, with mask_truncated) get zero
    advantages and stay out of batch statistics such as REINFORCE++'s whitening. Estimators that
    fold the KL into the reward get the per-token KL of the sampled tokens (needs ref_logprobs).
    """
    if not samples:
        return
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    width = max(int(lengths.max()), 1)
    trainable = torch.tensor([s.trainable for s in samples])
    mask = (torch.arange(width) < lengths[:, None]) & trainable[:, None]
    if any(s.response_mask is not None for s in samples):  # multi-turn: observation tokens are not the model's
        mask = mask & token_masks(samples, width).bool()
    token_kl = None
    if folds_kl_into_reward(estimator) and algo.kl_coef > 0:
        old = pad_rows([s.old_logprobs for s in samples], width, "cpu")
        ref = pad_rows([s.ref_logprobs for s in samples], width, "cpu")
        token_kl = kl_penalty(old, ref, algo.kl_estimator)
    advantages = estimator(
        rewards, mask, group_size=group_size, scale_by_std=algo.scale_by_std,
        token_kl=token_kl, kl_coef=algo.kl_coef,
    )
    for s, row in zip(samples, advantages.tolist()):
        s.advantage = row[: len(s.response_ids)]


def shaping_metrics(algo: AlgorithmConfig, rollouts: Rollouts, batch: Rollouts, samples: list[Sample],
                    num_rounds: int) -> dict[str, float]:
    """Metrics of the DAPO switches of ``algo`` that are on."""
    out = {}
    if algo.overlong_buffer > 0:
        out["reward/overlong_penalty_mean"] = (rollouts.shaped_rewards - rollouts.rewards).mean().item()
    if algo.mask_truncated:
        out["response/masked_fraction"] = sum(not s.trainable for s in samples) / max(len(samples), 1)
    if algo.dynamic_sampling:
        out["data/sampling_rounds"] = float(num_rounds)
        out["reward/kept_group_fraction"] = len(batch.completions) / len(rollouts.completions)
    return out


def rollout_metrics(rollouts: Rollouts, env_metrics: dict[str, float], group_size: int) -> dict[str, float]:
    """Reward and response metrics of every completion generated in a step. With tasks (rows with a
    ``task`` metadata) also ``reward/<task>/mean``; env_metrics of several tasks arrive as
    ``<task>/<name>`` and are logged as ``reward/<task>/<name>``."""
    completions, rewards = rollouts.completions, rollouts.rewards
    lengths = [len(c.token_ids) for c in completions]
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        **{f"reward/{k}": float(v) for k, v in env_metrics.items()},
        **per_task_means(rollouts.prompts, rewards.tolist(), "reward/{task}/mean"),
        "reward/errors": float(sum(e is not None for e in rollouts.errors)),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    if completions and isinstance(completions[0], Episode):
        metrics.update(episode_metrics(completions))
    if group_size > 1:  # groups whose completions all scored the same teach nothing
        metrics["reward/zero_std_groups"] = (rewards.view(-1, group_size).std(dim=1) == 0).float().mean().item()
    return metrics


def timing_metrics(
    rollouts: Rollouts, num_response_tokens: int, step_start: float, t_scored: float, t_trained: float,
    wait_s: float | None = None,
) -> dict[str, float]:
    """Throughput and the generate / score / train split of one step (perf_counter times).
    ``wait_s``: asynchronous rollouts, where generation and scoring ran in the background and the
    step only waited ``wait_s`` for them; ``time/prepare`` is then the trainer's own work before
    the update (reference and old logprobs, advantages)."""
    metrics = {
        "perf/tokens_per_s": num_response_tokens / (t_trained - step_start),
        "perf/gen_tokens_per_s": num_response_tokens / rollouts.generate_s,
        "time/generate": rollouts.generate_s,
        "time/train": t_trained - t_scored,
        "time/step": t_trained - step_start,
    }
    if wait_s is None:
        metrics["time/score"] = t_scored - step_start - rollouts.generate_s
    else:
        metrics["time/prepare"] = t_scored - step_start - wait_s
    return metrics


def engine_metrics(engine: Any) -> dict[str, float]:
    """posttrain's engine's counters for the generation since it last woke (``engine/*``:
    preemptions, prefix-cache hit tokens, KV blocks, CUDA graph captures); none for other backends."""
    stats = getattr(engine, "stats", None)
    return stats() if callable(stats) else {}


def needs_another_round(rounds: list[Rollouts], algo: AlgorithmConfig, rollout: RolloutConfig) -> bool:
    """Dynamic sampling (DAPO): another round of prompts while fewer than a batch's worth of groups
    have differing rewards, up to algorithm.max_sampling_rounds."""
    group_size = rollout.group_size
    return (algo.dynamic_sampling and len(rounds) < algo.max_sampling_rounds
            and sum(int(informative_groups(r.shaped_rewards, group_size).sum()) for r in rounds)
            < rollout.batch_size // group_size)


def generate_and_score(
    engine: HFEngine,
    rewards: RewardPool,
    sampler: EpochSampler,
    train_prompts: list[TokenizedPrompt],
    sampling: SamplingParams,
    rollout: RolloutConfig,
    algo: AlgorithmConfig,
    system_prompt: str,
) -> Rollouts:
    """One round: the sampler's next prompts -> ``sampling.n`` completions each -> rewards, with the
    overlong shaping of ``algo`` (DAPO) against ``rollout.max_new_tokens``.

    With ``rollout.max_turns > 1`` each completion is a multi-turn ``Episode`` (rollout/episodes.py,
    its turns after ``system_prompt``: model.system_prompt) and its reward is the one of the
    episode's final step."""
    start = time.perf_counter()
    batch_prompts = [train_prompts[i] for i in sampler.next_batch()]
    if rollout.max_turns > 1:
        return _generate_and_score_episodes(engine, rewards, batch_prompts, sampling, rollout, algo, system_prompt)
    groups = engine.generate([p.token_ids for p in batch_prompts], sampling)
    completions = [c for group in groups for c in group]
    prompts = [p for p in batch_prompts for _ in range(sampling.n)]
    generated = time.perf_counter()
    message_logs = [p.messages + [{"role": "assistant", "content": c.text}] for p, c in zip(prompts, completions)]
    scored = rewards.score(message_logs, [p.metadata for p in prompts])
    # DAPO overlong shaping: the advantages (and dynamic sampling) see the shaped rewards.
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    shaped = scored.rewards + overlong_penalty(lengths, rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    return Rollouts(prompts, completions, message_logs, scored.rewards, shaped, scored.metadata,
                    scored.answers, scored.errors, generated - start, time.perf_counter() - generated)


def _generate_and_score_episodes(engine: HFEngine, rewards: RewardPool, batch_prompts: list[TokenizedPrompt],
                                 sampling: SamplingParams, rollout: RolloutConfig, algo: AlgorithmConfig,
                                 system_prompt: str) -> Rollouts:
    result = run_episodes(
        engine, rewards, batch_prompts, sampling, engine.tokenizer, max_turns=rollout.max_turns,
        system_prompt=system_prompt,
    )
    episodes = result.episodes
    # rollout.max_new_tokens bounds each turn, so the overlong shaping looks at the last turn's length.
    lengths = torch.tensor([e.last_turn_tokens for e in episodes])
    shaped = result.rewards + overlong_penalty(lengths, rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    return Rollouts([e.prompt for e in episodes], episodes, [e.messages for e in episodes], result.rewards, shaped,
                    result.metadata, result.answers, result.errors, result.generate_s, result.score_s)


@torch.no_grad()
def fill_reference_logprobs(reference, samples: list[Sample], trainer: TrainerConfig, rollout: RolloutConfig,
                            model_cfg: ModelConfig, pad_token_id: int, device, autocast) -> None:
    """``reference``: the frozen copy, or with LoRA the policy itself, run with adapters disabled.
    It routes on its own (no router replay): the KL is to the reference policy as it is. The
    sections as in ``_sample_logprobs``."""
    with adapters_disabled(reference):
        for s, logprobs in zip(samples, _sample_logprobs(reference, samples, trainer, rollout, model_cfg, pad_token_id,
                                                         device, autocast)):
            s.ref_logprobs = logprobs


def old_logprobs_from_update(model, samples: list[Sample], optimizer_steps_per_step: int) -> bool:
    """Whether ``policy_update(old_from_update=True)`` gives the trainer's old logprobs instead of
    :func:`recompute_old_logprobs`: with one optimizer step per step no weight changes before any
    micro-batch's forward pass, so the update's own pass (detached) computes the same numbers. MoE
    samples with engine routes keep the separate pass, which also measures route agreement."""
    return optimizer_steps_per_step == 1 and bool(samples) and grouped_moe_for_routes(model, samples) is None


def recompute_old_logprobs(model, samples: list[Sample], pad_token_id: int, device, autocast, *,
                           trainer: TrainerConfig, rollout: RolloutConfig, model_cfg: ModelConfig,
                           router_replay: bool) -> dict[str, float]:
    """The trainer's own logprobs become the old logprobs of the ratio; the engine's are kept as
    rollout logprobs (the behaviour policy of ``algorithm.off_policy_correction``). Returns the
    engine/trainer mismatch over trained tokens: ``rollout/logprob_mismatch_mean`` and ``_max``
    (a growing mismatch is a known cause of RL collapse).

    MoE samples with engine routes: with ``router_replay`` (``moe.router_replay``) the forward
    replays them (R3), and ``moe/route_agreement`` (per layer and their mean) says how often the
    trainer's router would have chosen the engine's expert set on its own, over the trained tokens'
    predicting positions. The sections as in ``_sample_logprobs``."""
    was_training = model.training
    model.eval()
    moe = grouped_moe_for_routes(model, samples)
    agreement = RouteAgreement(moe.num_layers) if moe is not None else None
    try:
        for s, logprobs in zip(samples, _sample_logprobs(model, samples, trainer, rollout, model_cfg, pad_token_id,
                                                         device, autocast, moe=moe, replay=router_replay,
                                                         agreement=agreement)):
            s.rollout_logprobs, s.old_logprobs = s.old_logprobs, logprobs
    finally:
        model.train(was_training)
    metrics = logprob_mismatch_metrics(samples)
    if agreement is not None:
        metrics.update(agreement.metrics())
    return metrics


@torch.no_grad()
def _sample_logprobs(model, samples: list[Sample], trainer: TrainerConfig, rollout: RolloutConfig,
                     model_cfg: ModelConfig, pad_token_id: int, device, autocast,
                     moe: GroupedMoE | None = None, replay: bool = False,
                     agreement: RouteAgreement | None = None) -> list[list[float]]:
    """Micro-batches as ``trainer`` splits them, logprobs at ``rollout.temperature``, computed as
    ``model_cfg`` says (chunked_logprobs, float32_logits). ``moe``: the policy's grouped MoE blocks,
    given when samples carry engine routes; ``replay`` then replays them, and ``agreement``
    accumulates the router's own choices against them."""
    packed = packs_samples(model, trainer.micro_batch_tokens, autocast)
    # Read once at the end: a read per micro-batch would leave the GPU idle while the host collates the next.
    computed: list[tuple[list[Sample], torch.Tensor]] = []
    for micro_batch in split_micro_batches(samples, trainer.micro_batch_size, trainer.micro_batch_tokens, packed):
        batch = collate(micro_batch, pad_token_id, device, packed,
                        packed_row_tokens(model, trainer.packed_row_tokens, micro_batch), routes=moe is not None)
        routed = batch.routes is not None
        with autocast(), (moe.replaying(batch.routes) if replay and routed else contextlib.nullcontext()), \
                (moe.recording(router_choice=True) if agreement is not None and routed else contextlib.nullcontext()) as chosen:
            logprobs, _ = response_logprobs(
                model, batch.tokens, temperature=rollout.temperature, chunk_size=model_cfg.chunked_logprobs,
                float32_logits=model_cfg.float32_logits,
            )
        if chosen is not None:
            agreement.add(chosen, batch.routes, *router_token_index(batch.tokens, batch.loss_mask))
        computed.append((micro_batch, logprobs.float()))
    out: dict[int, list[float]] = {}  # by id: token-budget micro-batches do not keep the sample order
    for micro_batch, logprobs in computed:
        logprobs = logprobs.cpu()
        out.update((id(s), logprobs[i, : len(s.response_ids)].tolist()) for i, s in enumerate(micro_batch))
    return [out[id(s)] for s in samples]
