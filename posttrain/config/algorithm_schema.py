"""Config schema of the ``algorithm.*`` section: advantages, policy losses, KL, entropy, off-policy
corrections and reward shaping (names from the registries of posttrain.algorithms)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema_fields import opt


@dataclass
class AlgorithmConfig:
    advantage: str = opt(
        "grpo",
        "Advantage estimator, by registered name: 'grpo' (group mean, optionally / group std), 'rloo' "
        "(leave-one-out baseline), 'reinforce_plus_plus' (gamma=1 token returns, KL in the reward, "
        "whitened over the batch), 'reinforce_plus_plus_baseline' (group mean subtracted, then as "
        "reinforce_plus_plus). See docs/algorithms/.",
        registry="ADVANTAGE_ESTIMATORS", where={"needs_critic": None},
    )
    scale_by_std: bool = opt(
        True,
        "GRPO: divide group-centred rewards by the group's std (DeepSeekMath). False gives "
        "Dr.GRPO's unscaled advantages (Liu et al. 2025), which avoid favouring easy/hard groups.",
    )
    policy_loss: str = opt(
        "ppo_clip",
        "Policy loss, by registered name: 'ppo_clip' (per-token ratio) or 'gspo' (one length-normalised "
        "ratio per sequence, clipped with gspo_clip_low/high; use loss_agg_mode=seq-mean-token-mean).",
        registry="POLICY_LOSSES",
    )
    clip_ratio_low: float = opt(0.2, "PPO clip: lower bound of the ratio is 1 - clip_ratio_low (Schulman et al. 2017).")
    clip_ratio_high: float = opt(
        0.2, "PPO clip: upper bound of the ratio is 1 + clip_ratio_high (DAPO's clip-higher uses 0.28)."
    )
    dual_clip_c: float = opt(
        0.0,
        "Dual-clip PPO (Ye et al. 2020): for negative advantages the per-token loss is capped at "
        "-dual_clip_c * A, so a token whose ratio exploded cannot dominate the update. 0: off; when on "
        "it must be > 1 (3 is common). policy_loss=ppo_clip only.",
    )
    gspo_clip_low: float = opt(
        3e-4, "GSPO: the sequence ratio is clipped below at 1 - gspo_clip_low (paper: 3e-4)."
    )
    gspo_clip_high: float = opt(
        4e-4, "GSPO: the sequence ratio is clipped above at 1 + gspo_clip_high (paper: 4e-4)."
    )
    is_correction_cap: float = opt(
        0.0,
        "Truncated importance sampling (Yao et al. 2025, 'Your efficient RL framework secretly brings "
        "you off-policy RL training'): when > 0, the trainer recomputes the old logprobs with its own "
        "forward pass and weights each token's policy loss by min(pi_old / pi_rollout, cap), "
        "correcting for engine/trainer mismatch; 2.0 is a common cap. 0: off. With rollout.backend=engine (the "
        "default) the weights stay near 1 (the engine's kernels round differently from the trainer's); with "
        "rollout.backend=hf, whose logprobs come from the trainer's own forward pass, they are exactly 1; with "
        "rollout.backend=openai they also correct for the server's numerics. The older spelling of "
        "off_policy_correction=tis_token, deprecated (it warns): when > 0 it selects that correction with this cap "
        "(overriding off_policy_cap); it cannot be combined with another off_policy_correction.",
    )
    off_policy_correction: str = opt(
        "none",
        "Correction for samples the engine drew from another policy (async staleness, engine numerics), by "
        "registered name, weighting or masking each token's loss by the ratio pi_old / pi_behaviour (trainer over "
        "engine logprobs): 'none'; 'tis_token': min(ratio, off_policy_cap) per token; 'tis_seq': the sequence's "
        "product of ratios, capped, on all its tokens; 'geo_mask': drops sequences whose geometric-mean ratio is "
        "outside [off_policy_low, off_policy_high]; 'icepop': drops tokens whose ratio is outside that range. "
        "Anything but 'none' makes the trainer recompute the old logprobs. What each does, when to use it, papers "
        "and the off_policy/* metrics every run logs: docs/off_policy.md.",
        registry="OFF_POLICY_CORRECTIONS",
    )
    off_policy_cap: float = opt(2.0, "tis_token / tis_seq: the truncation of the importance weight.")
    off_policy_low: float = opt(0.5, "geo_mask / icepop: the lowest ratio kept.")
    off_policy_high: float = opt(2.0, "geo_mask / icepop: the highest ratio kept.")
    kl_coef: float = opt(
        0.0,
        "Weight of the KL penalty to the frozen reference model. 0 skips the reference model "
        "entirely (saves memory and a forward pass; DAPO and Dr.GRPO drop it); DeepSeekMath used 0.04. "
        "With advantage=reinforce_plus_plus(_baseline) the KL is a per-token reward term instead of a "
        "loss term.",
    )
    kl_estimator: str = opt(
        "k3", "KL estimator (Schulman 2020, 'Approximating KL divergence'): k1, k2 or k3 (low variance, >= 0).",
        registry="KL_ESTIMATORS",
    )
    entropy_coef: float = opt(0.0, "Entropy bonus weight (0: entropy is only logged).")
    loss_agg_mode: str = opt(
        "token-mean",
        "How per-token losses become one number: 'token-mean' (every token of the mini-batch weighs "
        "the same; DAPO), 'seq-mean-token-mean' (each sequence weighs the same; original GRPO), "
        "'seq-mean-token-sum-norm' (token sums divided by a constant; Dr.GRPO).",
        registry="LOSS_AGGREGATIONS",
    )
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    overlong_buffer: int = opt(
        0,
        "DAPO overlong reward shaping: over the last overlong_buffer tokens before rollout.max_new_tokens "
        "the reward falls linearly, by up to overlong_penalty at the limit. 0: off; must be < "
        "rollout.max_new_tokens.",
    )
    overlong_penalty: float = opt(1.0, "DAPO overlong reward shaping: the penalty at rollout.max_new_tokens.")
    mask_truncated: bool = opt(
        False,
        "DAPO overlong filtering: completions cut off at rollout.max_new_tokens are left out of the loss "
        "(their loss mask is zeroed); they still count in their group's baseline.",
    )
    dynamic_sampling: bool = opt(
        False,
        "DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage) and sample more "
        "prompts until rollout.batch_size / group_size informative groups are collected or "
        "max_sampling_rounds is reached; the update then uses the kept groups only.",
    )
    max_sampling_rounds: int = opt(
        3, "Dynamic sampling: generation rounds per step at most (each draws a full batch of prompts)."
    )
