"""Where engine replicas run for asynchronous rollouts (``cluster.backend``): in this process
(``replicas``: copies of the policy generating in threads) or as Ray actors (``ray_pool``); and
where rewards are computed: worker processes (``posttrain.envs.reward_pool``) or Ray actors
(``ray_rewards``). The recipe asks ``build_replica_pool`` and ``build_reward_pool`` for them and
never imports ray itself."""

from __future__ import annotations

import copy
from typing import Any

import torch

from posttrain.cluster.process_pool import ProcessReplicaPool
from posttrain.cluster.ray_pool import RayReplicaPool
from posttrain.cluster.ray_rewards import RayRewardPool
from posttrain.cluster.replicas import EngineReplica, LocalReplicaPool, ReplicaError, unwrap_policy
from posttrain.envs.reward_pool import RewardPool

__all__ = ["EngineReplica", "LocalReplicaPool", "ProcessReplicaPool", "RayReplicaPool", "RayRewardPool", "ReplicaError", "build_replica_pool",
           "build_reward_pool"]


def build_replica_pool(cfg: Any, model: torch.nn.Module, tokenizer: Any, compute_dtype: torch.dtype,
                       start_version: int) -> Any:
    """The engine replicas of ``cluster.backend``: 'local' copies the trainer's policy into
    ``rollout.num_replicas`` replicas in this process; 'process' starts that many child processes
    and 'ray' Ray actors, which load their own copy and get the trainer's weights pushed."""
    if cfg.cluster.backend == "ray":
        return RayReplicaPool(cfg, start_version=start_version, model=model)
    if cfg.cluster.backend == "process":
        return ProcessReplicaPool(cfg, start_version=start_version, model=model)
    policy = unwrap_policy(model)
    replicas = []
    for i in range(cfg.rollout.num_replicas):
        replica_model = copy.deepcopy(policy).requires_grad_(False)  # the trainer keeps changing its own modules
        for module in replica_model.modules():
            # trainer.compile_layers: a layer's compiled call wraps the *trainer's* layer (a bound
            # method), which a deep copy keeps; the copy must call its own modules.
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        replicas.append(EngineReplica(cfg, replica_model, tokenizer, compute_dtype, replica_id=i, version=start_version))
    return LocalReplicaPool(replicas, cfg.cluster.wait_timeout_s)


def build_reward_pool(env: Any, cluster: Any) -> RewardPool:
    """The reward pool of ``cluster.backend`` for ``env`` (``cfg.env``; ``cluster`` is
    ``cfg.cluster``): 'local' runs ``env.num_workers`` worker processes, 'ray' as many Ray actors
    (``cluster.cpus_per_reward_worker`` CPUs each, ``cluster.wait_timeout_s`` to start). Both have
    ``env.timeout_s`` per sample and the same crash containment; ``env.num_workers=0`` scores in
    this process with either backend (debugging: no timeouts)."""
    if cluster.backend == "ray" and env.num_workers > 0:
        return RayRewardPool(env.cls, env.kwargs, env.num_workers, env.timeout_s, cluster, tasks=env.tasks)
    return RewardPool(env.cls, env.kwargs, env.num_workers, env.timeout_s, tasks=env.tasks)
