"""Values the recipes derive from a config, computed in one place (so the recipes, --dry-run and
the engine's sizing agree): each is a pure function of the loaded config (or, where a component
that takes config sections needs it, of those sections)."""

from __future__ import annotations

from typing import Any

from posttrain.sampling import SamplingParams


def validation_max_new_tokens(cfg: Any) -> int:
    """Tokens a validation completion may reach: validation.max_new_tokens, or the rollouts' limit."""
    return cfg.validation.max_new_tokens or cfg.rollout.max_new_tokens


def optimizer_steps_per_step(algorithm: Any, rollout: Any, trainer: Any) -> int:
    """Optimizer steps in one training step of a policy-gradient recipe: every epoch over the
    batch (algorithm.ppo_epochs) takes rollout.batch_size / trainer.mini_batch_size of them. The
    LR schedule counts these, and so do policy versions. Takes the sections, as policy_update does."""
    return algorithm.ppo_epochs * (rollout.batch_size // trainer.mini_batch_size)


def uses_engine_replicas(cfg: Any) -> bool:
    """Whether a GRPO run generates with engine replicas on their own copies of the policy (in
    this process, in child processes or as Ray actors) instead of an engine on the trainer's
    modules: in async runs, and with cluster.backend=process or ray, where a synchronous run is the
    replicas' schedule with max_staleness 0."""
    return cfg.rollout.mode == "async" or cfg.cluster.backend in ("process", "ray")


def replica_max_staleness(cfg: Any) -> int:
    """Policy versions a sample from the replicas may lag: rollout.max_staleness in async runs;
    0 in synchronous ones (each batch is generated after the previous step's weights arrived)."""
    return cfg.rollout.max_staleness if cfg.rollout.mode == "async" else 0


def needs_reference_copy(cfg: Any) -> bool:
    """Whether a policy-gradient run holds a frozen copy of the starting policy for its KL term:
    with algorithm.kl_coef > 0, unless the policy is LoRA (model.lora.r > 0), whose reference is
    itself with the adapters disabled."""
    return cfg.algorithm.kl_coef > 0 and cfg.model.lora.r == 0


def rollout_sampling(cfg: Any) -> SamplingParams:
    """How the rollouts of a policy-gradient recipe sample: rollout.group_size completions per
    prompt, with the rollout section's temperature, top-p/top-k, length limit and stop strings."""
    r = cfg.rollout
    return SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_tokens=r.max_new_tokens, stop=list(r.stop))
