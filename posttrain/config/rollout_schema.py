"""Config schema of the ``rollout.*`` section (generation of completions; its engine and cluster
options are in cluster_schema.py) and the ``sync.*`` section (weights from trainer to engine)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema_fields import opt, section
from posttrain.config.cluster_schema import EngineConfig


@dataclass
class RolloutConfig:
    backend: str = opt(
        "engine",
        "Generation engine. 'engine': posttrain's own (paged KV cache, continuous batching, prefix sharing, CUDA "
        "graphs) on the policy's own modules; Llama, Qwen2, Qwen3 and Mistral families (other models fall back to "
        "'hf' with a warning). 'hf': batched transformers generate on the policy's own modules (the reference "
        "implementation). 'openai': a remote OpenAI-compatible server at rollout.base_url (`posttrain serve`, "
        "vLLM, SGLang); weights reach it as sync.mode says. See docs/engine.md and docs/weight_sync.md.",
        ("engine", "hf", "openai"),
    )
    engine: EngineConfig = section(EngineConfig, "The posttrain engine (rollout.backend=engine).")
    recompute_logprobs: bool = opt(
        True,
        "backend=engine/openai: recompute the old logprobs of the PPO ratio with the trainer's forward pass "
        "(the engine's differ by kernel rounding, about 1e-2 in bf16); the engine/trainer difference is logged "
        "as rollout/logprob_mismatch_mean and _max. GRPO and PPO with one optimizer step per step (ppo_epochs=1, "
        "trainer.mini_batch_size >= rollout.batch_size; not MoE samples with engine routes) takes them from the "
        "update's own forward pass, where no weight has changed yet, instead of a pass of their own. "
        "false: use the engine's logprobs as they are.",
    )
    base_url: str = opt(
        "", "backend=openai: the server's address, e.g. http://127.0.0.1:8000 (with or without a trailing /v1)."
    )
    api_key: str = opt("", "backend=openai: bearer token sent to the server (empty: none; $OPENAI_API_KEY is not read).")
    model_name: str = opt(
        "", "backend=openai: the `model` field of requests (empty: the first model the server lists at /v1/models)."
    )
    max_concurrency: int = opt(
        32, "backend=openai: requests in flight at once; each samples one prompt's group (n completions)."
    )
    request_timeout_s: float = opt(600.0, "backend=openai: seconds one generation request may take before it fails.")
    batch_size: int = opt(128, "Completions generated per training step (prompts per step x group_size).")
    group_size: int = opt(8, "Completions sampled per prompt (the GRPO group).")
    max_new_tokens: int = opt(128, "Maximum tokens generated per completion; longer ones are truncated.")
    temperature: float = opt(1.0, "Sampling temperature (also applied to the trainer's logprobs).")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1.0: off).")
    top_k: int = opt(0, "Sample only from the k most likely tokens (0: off).")
    stop: list = opt([], "Stop strings; generation ends after any of them (EOS always stops).")
    generation_batch_size: int = opt(
        128, "Sequences per generate call; lower it if generation runs out of memory."
    )
    max_turns: int = opt(
        1,
        "Most model turns per episode. 1: single-turn (one completion per sample). > 1: multi-turn "
        "episodes: while the environment does not terminate, its observation (e.g. a tool result) is "
        "appended and the model continues, up to max_turns generations; the episode's reward is the "
        "final step's, observation tokens get no loss. GRPO only; needs model.use_chat_template=true. "
        "See docs/environments.md.",
    )
    source: str = opt(
        "generate",
        "Where a step's scored groups come from. 'generate': the trainer generates (rollout.backend) and "
        "scores (env). 'api': environment processes generate and score, and submit groups to the rollout "
        "API at rollout.api_url (`posttrain rollout-api`); the trainer pulls batch_size/group_size groups "
        "per step. GRPO only. See docs/rollout_api.md.",
        ("generate", "api"),
    )
    mode: str = opt(
        "sync",
        "'sync': each step generates its own batch with the newest weights, then trains (on-policy). 'async': "
        "engine replicas (cluster.backend) generate the next batches while the trainer trains, up to "
        "max_staleness policy versions ahead; the old logprobs are recomputed by the trainer and the engine's "
        "behaviour logprobs feed algorithm.off_policy_correction. See docs/scale-out.md.",
        ("sync", "async"),
    )
    max_staleness: int = opt(
        1,
        "async: most policy versions (training steps) a trained sample may lag behind the trainer. At most "
        "max_staleness + 1 batches of prompts are accepted or running at once (admission control), so nothing "
        "generated is dropped for being stale. 0: every batch is generated with the newest weights (equals sync).",
    )
    num_replicas: int = opt(1, "async: engine replicas generating in parallel; each step's prompt groups are split among them.")
    gpus_per_replica: float = opt(
        0.0,
        "async with cluster.backend=ray: GPUs each replica actor reserves; fractions share a GPU (0.5: two per GPU, "
        "or one beside the trainer). 0: CPU replicas.",
    )
    partial_rollouts: bool = opt(
        True,
        "async, rollout.backend=engine: a weight update pauses the engine between decode steps, swaps the weights "
        "and resumes the requests in flight under the new version (each token records the version that sampled "
        "it). false: updates wait until the replica's current requests finish.",
    )
    partial_recompute_kv: bool = opt(
        False,
        "partial_rollouts: what the requests in flight keep across a weight update. false (as PipelineRL): "
        "their KV cache, computed by the old weights, so the tokens after the update see old keys and values of "
        "the earlier ones; no extra work. true: the cache is dropped and each running request is prefilled again "
        "(prompt and generated tokens) under the new weights, so its later tokens are exactly what the new policy "
        "samples after that prefix, at the cost of one prefill per running request and update. See "
        "docs/off_policy.md.",
    )
    api_url: str = opt("", "source=api: the rollout API's address, e.g. http://127.0.0.1:8100.")
    api_timeout_s: float = opt(
        600.0, "source=api: seconds a step waits for enough groups before the run stops with an error."
    )


@dataclass
class SyncConfig:
    mode: str = opt(
        "auto",
        "How new policy weights reach the engine. 'shared': the engine reads the trainer's parameters in "
        "place (0 bytes): in-process (rollout.backend=engine or hf), or a `posttrain serve "
        "--enable-tensor-updates` on the same machine and device, through CUDA IPC or shared memory. "
        "'broadcast': trainer rank 0 broadcasts bucketed tensors over a torch.distributed group (NCCL on "
        "GPU, gloo on CPU) to the server. 'checkpoint': safetensors written to shared memory (/dev/shm) and "
        "reloaded by the server straight to its device. 'lora': only the LoRA adapter moves (model.lora.r "
        "> 0). 'auto': shared for an in-process engine, lora for a LoRA policy on a server, else checkpoint. "
        "See docs/weight_sync.md.",
        ("auto", "shared", "broadcast", "checkpoint", "lora"),
    )
    interval: int = opt(
        1, "Sync after every k-th optimizer step (1: after every policy update, so rollouts are on-policy)."
    )
    max_staleness: int = opt(
        0,
        "Force a sync when the engine's weights are more than this many policy versions (optimizer steps) "
        "behind the trainer's (0: off; interval alone decides).",
    )
    timeout_s: float = opt(0.0, "Force a sync at least every this many seconds when the policy has changed (0: off).")
    bucket_mb: float = opt(
        512.0, "broadcast: megabytes per bucket (one HTTP call and a run of broadcasts each); bounds the extra memory."
    )
    dtype: str = opt(
        "auto",
        "Dtype of the weights sent (broadcast, checkpoint): 'auto' keeps the trainer's (float32 master "
        "weights); bfloat16 halves the bytes when the engine computes in bfloat16.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    collective_timeout_s: float = opt(
        120.0,
        "broadcast: seconds for the engine to join the group or to finish a collective; then the run stops "
        "with an error naming the engine and the step, instead of hanging.",
    )
    master_address: str = opt(
        "127.0.0.1", "broadcast: address of the trainer that the engine connects to (the group's rendezvous)."
    )
    master_port: int = opt(0, "broadcast: port of the group's rendezvous on the trainer (0: a free port).")
    backend: str = opt(
        "auto", "broadcast: torch.distributed backend; 'auto' is nccl when the policy is on a GPU, else gloo.",
        ("auto", "nccl", "gloo"),
    )
    checkpoint_dir: str = opt(
        "",
        "checkpoint and lora: folder the weights are written to; the server must read the same path. "
        "Empty: a folder under /dev/shm (memory) when it exists, else under the system temp folder.",
    )
