"""Cross-field checks of engine replicas and their cluster: asynchronous rollouts (rollout.mode=async)
and synchronous ones in replica processes or on Ray (cluster.backend=process|ray), cluster.*."""

from __future__ import annotations

from typing import Any

from posttrain.config.schema import GRPOConfig


def async_problems(cfg: Any) -> list[str]:
    """One message per problem, each naming its keys and the fix."""
    r, c = cfg.rollout, cfg.cluster
    problems: list[str] = []
    if r.max_staleness < 0:
        problems.append(f"rollout.max_staleness={r.max_staleness} must be >= 0 (0: every batch uses the newest weights).")
    if r.num_replicas < 1:
        problems.append(f"rollout.num_replicas={r.num_replicas} must be >= 1.")
    if r.gpus_per_replica < 0:
        problems.append(f"rollout.gpus_per_replica={r.gpus_per_replica} must be >= 0 (0: CPU replicas).")
    if c.wait_timeout_s <= 0:
        problems.append(f"cluster.wait_timeout_s={c.wait_timeout_s} must be > 0 seconds.")
    if c.max_replica_restarts < 0:
        problems.append(f"cluster.max_replica_restarts={c.max_replica_restarts} must be >= 0.")
    if c.cpus_per_reward_worker < 0:
        problems.append(f"cluster.cpus_per_reward_worker={c.cpus_per_reward_worker} must be >= 0.")
    if r.partial_recompute_kv and (r.mode != "async" or not r.partial_rollouts or r.backend != "engine"):
        # It would do nothing: only posttrain's engine in async replicas takes weights mid-generation.
        problems.append(f"rollout.partial_recompute_kv=true applies to weight updates in the middle of a generation, "
                        f"which happen only with rollout.mode=async, rollout.partial_rollouts=true and "
                        f"rollout.backend=engine (this run: mode={r.mode}, partial_rollouts={str(r.partial_rollouts).lower()}, "
                        f"backend={r.backend}); set those or rollout.partial_recompute_kv=false.")
    if r.mode != "async" and c.backend == "local":
        return problems
    # Engine replicas: async runs, and synchronous runs in replica processes or on Ray (the
    # replicas' schedule with staleness 0).
    what = "rollout.mode=async" if r.mode == "async" else f"cluster.backend={c.backend}"
    if c.backend == "process" and cfg.sync.mode != "auto":
        problems.append(f"sync.mode={cfg.sync.mode} with cluster.backend=process: replica processes get the weights "
                        "through shared memory (CPU) or CUDA IPC (GPU); leave sync.mode=auto.")
    if type(cfg) is not GRPOConfig:
        problems.append(f"{what} is supported by the grpo command only; set rollout.mode=sync and cluster.backend=local.")
    if r.source != "generate":
        problems.append(f"{what} with rollout.source={r.source}: the rollout API is asynchronous already "
                        "(environments push groups as they finish); set rollout.mode=sync and cluster.backend=local.")
    if r.backend == "openai":
        problems.append(f"{what} runs its own engine replicas (rollout.backend=engine or hf); for a remote server use "
                        "rollout.mode=sync and cluster.backend=local with sync.interval / sync.max_staleness instead.")
    if r.max_turns > 1:
        problems.append(f"{what} with rollout.max_turns={r.max_turns}: multi-turn episodes run in the trainer's "
                        "process for now; set rollout.max_turns=1, or rollout.mode=sync and cluster.backend=local.")
    if cfg.env.num_workers < 1:
        problems.append(f"{what} scores in a background thread, which needs reward worker processes "
                        "(math-verify's timeouts work only in a main thread): set env.num_workers >= 1.")
    if getattr(cfg.trainer, "num_processes", 1) > 1:
        problems.append(f"{what} with trainer.num_processes={cfg.trainer.num_processes}: one trainer "
                        "process drives the replicas for now; set trainer.num_processes=1 and add "
                        "rollout.num_replicas instead.")
    if cfg.model.lora.r > 0:
        problems.append(f"{what} with a LoRA policy (model.lora.r > 0) is not supported yet; use rollout.mode=sync "
                        "and cluster.backend=local (adapters hot-swap there) or full fine-tuning.")
    if cfg.sync.mode in ("shared", "lora") and c.backend != "process":
        problems.append(f"sync.mode={cfg.sync.mode} with {what}: replicas hold their own copy of the "
                        "weights, so they cannot read the trainer's in place; use sync.mode=auto (or broadcast / "
                        "checkpoint with cluster.backend=ray).")
    return problems
