"""Config schema of ``posttrain ppo`` (PPO with a learned critic).

``PPOConfig`` is ``GRPOConfig`` with a ``critic`` section and two sections whose defaults differ:
``rollout.group_size`` is 1 (GAE needs no groups) and ``algorithm.advantage`` is ``gae``. Every
other option means exactly what it means for ``posttrain grpo``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        registry="ADVANTAGE_ESTIMATORS", where={"needs_critic": True},
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
