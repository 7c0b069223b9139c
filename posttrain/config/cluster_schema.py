"""Config schema of where rollouts run: the posttrain engine (``rollout.engine.*``) and the cluster
that places engine replicas (``cluster.*``: in this process, or Ray actors). See docs/scale-out.md."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema_fields import opt


@dataclass
class EngineConfig:
    """posttrain's own generation engine (rollout.backend=engine). See docs/engine.md."""

    max_num_seqs: int = opt(
        256, "Most sequences decoding at once (continuous batching); more raise throughput until memory or compute runs out."
    )
    max_num_batched_tokens: int = opt(16384, "Most new prompt tokens computed in one prefill step.")
    block_size: int = opt(16, "Tokens per KV-cache block; also the granularity of prefix sharing.")
    kv_cache_memory_fraction: float = opt(
        0.5,
        "GPU: fraction of the device memory free at wake-up given to the KV cache (the trainer keeps the rest; "
        "the cache is freed again while it trains). Capped at what max_num_seqs full-length sequences need.",
    )
    cpu_kv_cache_gb: float = opt(2.0, "CPU: KV-cache size in GiB (capped at what max_num_seqs full-length sequences need).")
    cpu_dtype: str = opt(
        "float32",
        "CPU: dtype rollouts compute in. 'bfloat16' casts the fp32 weights to bf16 for each generate call and back "
        "after (2-3x faster matmuls on CPUs with AVX-512 BF16 or AMX; engine logprobs then differ from the "
        "trainer's by bf16 rounding, which rollout.recompute_logprobs takes care of). 'float32': exact.",
        ("float32", "bfloat16"),
    )
    max_model_len: int = opt(
        0,
        "Longest prompt + completion in tokens. 0: data.max_prompt_tokens + rollout.max_new_tokens (per turn for "
        "multi-turn episodes, plus 512 observation tokens per turn), within the model's max_position_embeddings.",
    )
    weight_copies: bool = opt(
        True,
        "GPU, float32 parameters (trainer.param_dtype=float32) generating in model.dtype: decode from 16-bit "
        "copies of the matmul weights, cast again after every weight update, instead of casting the float32 "
        "weights at every decode step (decoding reads a quarter of the bytes; same numbers). Costs 2 bytes per "
        "parameter of GPU memory for the whole run. false: no copies.",
    )
    cuda_graphs: bool = opt(True, "Capture decode steps in CUDA graphs (GPU); false: eager steps, for debugging.")
    compile: bool = opt(
        True,
        "GPU: torch.compile the per-layer work around attention (norms, projections, rotary, MLP) into fused "
        "kernels; the first rollout compiles for about half a minute. Falls back to eager if compilation fails.",
    )
    enable_prefix_caching: bool = opt(
        True, "Share KV blocks between sequences with the same prefix (a group's samples, repeated prompts, later turns)."
    )


@dataclass
class ClusterConfig:
    """Where engine replicas run: asynchronous rollouts (rollout.mode=async), and synchronous ones with
    cluster.backend=process or ray. See docs/scale-out.md."""

    backend: str = opt(
        "local",
        "'local': engine replicas live in the trainer's process, each on its own copy of the policy, generating "
        "in background threads (one machine, no extra dependency). 'process': each replica is a child process on "
        "this machine (its own Python interpreter: no GIL shared with the trainer; a crashed replica is restarted), "
        "weights through shared memory (CPU) or CUDA IPC (GPU). 'ray': each replica is a Ray actor (its own "
        "process, rollout.gpus_per_replica GPUs), so replicas can sit on other GPUs and nodes; needs `pip "
        "install ray`. Weights reach Ray replicas as sync.mode says (broadcast: NCCL on GPU, gloo on CPU; "
        "checkpoint: safetensors in shared memory).",
        ("local", "process", "ray"),
    )
    address: str = opt(
        "",
        "ray: the cluster to join. Empty: start a local Ray instance in this process (ray.init()); 'auto': join the "
        "cluster started with `ray start` on this node; 'ray://host:10001': a remote cluster through Ray Client.",
    )
    num_cpus: int = opt(0, "ray, local instance only: CPUs Ray may schedule (0: all of this machine's).")
    namespace: str = opt("posttrain", "ray: the namespace of the run's actors (separates runs sharing a cluster).")
    cpus_per_reward_worker: float = opt(
        0.5,
        "ray: CPUs each reward worker actor (env.num_workers of them) reserves. Ray counts them for placement only "
        "(no limit on what a worker uses); fractions let workers share a core, as they mostly wait between batches.",
    )
    max_replica_restarts: int = opt(
        3,
        "Restarts allowed per engine replica that dies (OOM kill, crash). A fresh replica takes its place with the "
        "latest weights and generates its unfinished share again (same seed), so no step is lost; a replica that "
        "dies more often stops the run with the cause.",
    )
    wait_timeout_s: float = opt(
        600.0,
        "Seconds any wait may take (a replica to start or answer, the next rollout batch); then the run stops "
        "with an error naming what it waited for.",
    )
