"""Config schema of ``posttrain ppo`` (PPO with a learned critic).

``PPOConfig`` is ``GRPOConfig`` with a ``critic`` section and two sections whose defaults differ:
``rollout.group_size`` is 1 (GAE needs no groups) and ``algorithm.advantage`` is ``gae``. Every
other option means exactly what it means for ``posttrain grpo``.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.loader import VALIDATORS, register_validator
from posttrain.config.schema import AlgorithmConfig, GRPOConfig, RolloutConfig, opt, section


@dataclass
class PPORolloutConfig(RolloutConfig):
    group_size: int = opt(
        1,
        "Completions sampled per prompt. PPO's baseline is the critic, so 1 is enough; more gives "
        "several samples of the same prompt per batch.",
    )


@dataclass
class PPOAlgorithmConfig(AlgorithmConfig):
    advantage: str = opt(
        "gae",
        "Advantage estimator: 'gae' (generalised advantage estimation over the critic's values; "
        "per-token rewards = the sequence reward on the last token minus kl_coef x KL on every token). "
        "The critic-free estimators are for `posttrain grpo`.",
        ("gae",),
    )
    kl_coef: float = opt(
        0.0,
        "Weight of the per-token KL to the frozen reference model, subtracted from the per-token "
        "rewards (RLHF shaping, Ouyang et al. 2022); it is logged but not a loss term. 0 skips the "
        "reference model; RLHF PPO used 0.01-0.05.",
    )
    whiten_advantages: bool = opt(
        True,
        "Normalise the GAE advantages to zero mean and unit std over the batch's tokens before the "
        "policy update (the critic's returns use the raw advantages).",
    )


@dataclass
class CriticConfig:
    path: str = opt(
        "",
        "The critic's starting weights: a hub id, model folder or .gguf file whose transformer gets a "
        "new value head. Empty: a separate copy of the policy's starting model (model.path).",
    )
    lr: float = opt(
        5e-5,
        "Peak learning rate of the critic's AdamW, usually higher than trainer.lr (a fresh value head has "
        "far to go); the other AdamW and schedule settings are trainer's.",
    )
    warmup_steps: int = opt(
        0,
        "Critic warm-up: the first N training steps update only the critic (the policy stays as it is), "
        "so the first policy updates see a critic that already predicts something.",
    )
    value_clip: float = opt(
        0.2,
        "PPO value clipping: the new value may move at most this far from the value at sampling time "
        "before its error stops improving the loss (0: off).",
    )
    gamma: float = opt(1.0, "GAE discount per token (1.0: the reward at the end counts fully for every token).")
    lam: float = opt(
        0.95, "GAE lambda: 1.0 is the Monte-Carlo return minus the value (high variance), 0.0 the one-step TD error (high bias)."
    )
    micro_batch_size: int = opt(
        0,
        "Completions per critic forward/backward (0: trainer.micro_batch_size); gradients accumulate to "
        "trainer.mini_batch_size exactly.",
    )


@dataclass
class PPOConfig(GRPOConfig):
    rollout: PPORolloutConfig = section(PPORolloutConfig, "Generation of completions.")
    algorithm: PPOAlgorithmConfig = section(PPOAlgorithmConfig, "Advantages and losses.")
    critic: CriticConfig = section(CriticConfig, "The value model (critic) and GAE.")


@register_validator(PPOConfig)
def _validate_ppo(cfg: PPOConfig) -> list[str]:
    """GRPO's checks (group_size 1 passes them for advantage=gae) plus the critic's."""
    c, a, t = cfg.critic, cfg.algorithm, cfg.trainer
    problems = list(VALIDATORS[GRPOConfig](cfg))
    if a.dynamic_sampling:
        problems = [p for p in problems if not p.startswith("algorithm.dynamic_sampling")]
        problems.append("algorithm.dynamic_sampling=true is not supported by `posttrain ppo` (the critic is the "
                        "baseline, so uniform groups still carry signal); set algorithm.dynamic_sampling=false.")
    if c.lr <= 0:
        problems.append(f"critic.lr={c.lr} must be > 0, e.g. critic.lr=1e-5.")
    if c.warmup_steps < 0:
        problems.append(f"critic.warmup_steps={c.warmup_steps} must be >= 0.")
    if c.value_clip < 0:
        problems.append(f"critic.value_clip={c.value_clip} must be >= 0 (0: no value clipping).")
    if not 0 <= c.gamma <= 1:
        problems.append(f"critic.gamma={c.gamma} must be in [0, 1] (1.0 is usual for language models).")
    if not 0 <= c.lam <= 1:
        problems.append(f"critic.lam={c.lam} must be in [0, 1] (0.95 is usual).")
    if c.micro_batch_size < 0:
        problems.append(f"critic.micro_batch_size={c.micro_batch_size} must be >= 0 (0: trainer.micro_batch_size).")
    elif c.micro_batch_size > 0 and t.mini_batch_size >= 1 and t.mini_batch_size % c.micro_batch_size != 0:
        problems.append(f"critic.micro_batch_size={c.micro_batch_size} must divide trainer.mini_batch_size="
                        f"{t.mini_batch_size} (gradients accumulate over whole micro-batches).")
    return problems
