"""Config schema of mixture-of-experts policies (``moe.*`` of GRPO and PPO): the router, the
random-init demo model, and the expert dtype. See docs/moe.md."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema_fields import opt, section


@dataclass
class MoERouterConfig:
    """The router of a mixture-of-experts policy. See docs/moe.md."""

    num_experts: int = opt(
        0,
        "Experts per MoE layer. 0: the model's own (its config's num_local_experts / num_experts); a "
        "loaded model with a different count stops the run, since the checkpoint fixes it. With "
        "moe.random_init: the experts of the built model (0 builds 8).",
    )
    top_k: int = opt(
        0,
        "Experts each token is routed to (the config's num_experts_per_tok). 0: the model's own; a loaded "
        "model with another value stops the run. With moe.random_init: 0 builds top-2 (Mixtral's).",
    )
    capacity_factor: float = opt(
        0.0,
        "Expert capacity as a multiple of the balanced load: an expert takes at most ceil(capacity_factor x "
        "tokens x top_k / num_experts) tokens of a forward pass (Switch Transformer; Megatron's "
        "--moe-expert-capacity-factor, typical 1.0-1.25). transformers' MoE blocks are dropless, so here it "
        "only sets the logged moe/dropped_fraction: the share of routed tokens an engine with this capacity "
        "would drop. 0: dropless, no metric.",
    )
    aux_loss_coef: float = opt(
        1e-3,
        "Weight of the load-balancing loss added to the policy loss (Switch Transformer, Fedus et al. 2021): "
        "num_experts x sum_i f_i x P_i per MoE layer, f_i the fraction of routed tokens sent to expert i and "
        "P_i its mean router probability, over the loss tokens; 1 under uniform routing. Summed over layers "
        "like Megatron's --moe-aux-loss-coeff (its recommended start: 1e-2), so coefficients carry over; "
        "transformers' load_balancing_loss_func pools layers and is top_k times larger. RL on a pretrained "
        "MoE keeps it small (1e-3) or 0: a strong pull moves routing away from what the rollouts saw.",
    )
    z_loss_coef: float = opt(
        0.0,
        "Weight of the router z-loss (ST-MoE, Zoph et al. 2022): the mean squared logsumexp of each token's "
        "router logits, per layer, summed over layers like Megatron's --moe-z-loss-coeff (recommended: 1e-3). "
        "Keeps router logits small, so bf16 rounding flips fewer top-k choices. 0: off (still logged).",
    )
    dtype: str = opt(
        "float32",
        "Dtype of the router's logits matmul and softmax. 'float32': computed in float32 even when the rest "
        "of the forward runs in bf16 (Megatron's --moe-router-dtype fp32): bf16 logits flip near-tied top-k "
        "choices between rollout and training. Needs float32 router weights (trainer.param_dtype=float32). "
        "'auto': model.dtype, like every other matmul.",
        ("float32", "auto"),
    )


@dataclass
class MoERandomInitConfig:
    family: str = opt(
        "",
        "Build a randomly initialised MoE policy of this transformers family instead of loading the weights "
        "of model.path, which then only gives the tokenizer: 'mixtral' (MixtralForCausalLM) or 'qwen3_moe' "
        "(Qwen3MoeForCausalLM). Experts and top-k come from moe.router. For demos and tests of the MoE "
        "path; a random model learns no task in a few steps. Empty: load model.path.",
        ("", "mixtral", "qwen3_moe"),
    )
    hidden_size: int = opt(64, "Width of the residual stream.")
    intermediate_size: int = opt(128, "Hidden width of each expert's MLP.")
    num_layers: int = opt(2, "Decoder layers (every one an MoE layer).")
    num_attention_heads: int = opt(4, "Attention heads; must divide hidden_size.")
    num_key_value_heads: int = opt(2, "Key/value heads (grouped-query attention); must divide num_attention_heads.")
    seed: int = opt(
        0, "Seed of the initial weights: the same seed builds the same model (the KL reference on resume is rebuilt)."
    )


@dataclass
class MoEConfig:
    router: MoERouterConfig = section(MoERouterConfig, "The router: experts, top-k, capacity, aux and z-loss, dtype.")
    router_replay: bool = opt(
        True,
        "Rollout routing replay (R3): the old-logprob and training forwards route every token to the experts "
        "the rollout engine chose for it (Completion.routed_experts), with the routing weights still from the "
        "softmax over the trainer's own router logits, so the router keeps learning. On by default for MoE; "
        "only takes effect for MoE policies whose rollouts carry routes, i.e. rollout.backend=engine (the "
        "KL reference routes on its own). false: the trainer routes on its own and logs moe/route_agreement. "
        "See docs/moe.md.",
    )
    expert_dtype: str = opt(
        "auto",
        "Dtype of the experts in rollouts on posttrain's engine (rollout.backend=engine, and engine replicas). "
        "'auto': model.dtype like the rest of the model (bf16 on GPU). 'fp8': the engine computes the experts "
        "from float8 e4m3 copies with one scale per output channel, quantized again at every weight sync; "
        "training stays in model.dtype. Needs an NVIDIA GPU of compute capability 8.9 or newer (scaled-matmul "
        "kernels on 9.0+, Hopper; on 8.9 the fp8 weights are dequantized each step, saving no time); no decode "
        "CUDA graphs. 'nvfp4' needs 10.0 or newer (Blackwell) and is not implemented yet. Checked against the GPU "
        "before loading. See docs/moe.md.",
        ("auto", "fp8", "nvfp4"),
    )
    ep_mode: str = opt(
        "single",
        "Expert parallelism in training (several processes, trainer.num_processes > 1). 'single': every "
        "process holds all experts and FSDP2 shards them like any weight. 'ipc': each MoE layer's experts are "
        "split over all processes of this node (E / world_size each; tokens travel to their experts' owner "
        "by all-to-all and back); the other weights keep FSDP2 over all processes. 'hybrid': experts split "
        "inside each node, data parallel across nodes. 'auto': single on one process, else the largest "
        "expert-parallel size that divides the experts and fits a node. The experts must split evenly. "
        "Checkpoints keep the single-device (Hugging Face) layout. See docs/moe.md.",
        ("single", "ipc", "hybrid", "auto"),
    )
    random_init: MoERandomInitConfig = section(
        MoERandomInitConfig, "A random-init MoE policy built from these sizes (moe.random_init.family), for demos."
    )
