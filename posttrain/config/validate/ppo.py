"""Cross-field checks of ``posttrain ppo``: GRPO's (group_size 1 passes them for advantage=gae)
plus the critic's."""

from __future__ import annotations

from posttrain.config.ppo_schema import PPOConfig
from posttrain.config.validate.grpo import grpo_problems


def ppo_problems(cfg: PPOConfig) -> list[str]:
    """GRPO's checks (group_size 1 passes them for advantage=gae) plus the critic's."""
    c, a, t = cfg.critic, cfg.algorithm, cfg.trainer
    problems = grpo_problems(cfg)
    if a.dynamic_sampling:
        problems = [p for p in problems if not p.startswith("algorithm.dynamic_sampling")]
        problems.append("algorithm.dynamic_sampling=true is not supported by `posttrain ppo` (the critic is the "
                        "baseline, so uniform groups still carry signal); set algorithm.dynamic_sampling=false.")
    # PPO's policy gets the MoE preparation but not the memory knobs (FSDP, expert parallelism).
    if cfg.moe.ep_mode in ("ipc", "hybrid"):
        problems.append(f"moe.ep_mode={cfg.moe.ep_mode}: `posttrain ppo` does not split experts over processes yet; "
                        "set moe.ep_mode=single, or train with `posttrain grpo`.")
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
