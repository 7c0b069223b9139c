"""The forward pass of a Hugging Face decoder over the paged KV cache, using the model's own modules.

The engine does not load or convert weights: it calls the trainer's ``nn.Module``s (embedding,
norms, projections, MLP, LM head; LoRA-wrapped layers included) and replaces only what
``transformers`` does around attention: the KV cache and the attention kernel. A weight update
in colocated training therefore moves zero bytes.

Supported families share the Llama layout: ``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (biases as in Qwen2), optional ``q_norm``/``k_norm``
(per head as in Qwen3, or over all heads with ``clip_qkv`` as in OLMoE), ``post_attention_layernorm``,
``mlp`` (``block_sparse_moe`` in GraniteMoE), then ``model.norm`` and ``lm_head``, rotary embeddings
with the half-rotation, and GraniteMoE's embedding, residual and logit multipliers. Adding a family
with that layout is one entry in ``DENSE_MODEL_TYPES`` (or ``MOE_MODEL_TYPES``, once its MoE block
is in hf_blocks' family table); see docs/engine.md for one that differs.

MoE layers run transformers' sparse MoE blocks on posttrain's grouped experts
(:func:`posttrain.models.moe.hf_blocks.use_grouped_experts`: the block's own router, no host sync
on a GPU with ``torch._grouped_mm``), outside the compiled part. Each step writes the expert ids
that every MoE layer chose for every new token into a route cache laid out like the KV cache
(one row per slot), so prefix-cached tokens keep their routes and CUDA graph replays write them too.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from posttrain.engine.attention import AttentionMetadata, write_kv
from posttrain.errors import PosttrainError
from posttrain.models.chunked_logprobs import matmul_float32_out
from posttrain.models.moe.grouped_experts import grouped_mm_supported
from posttrain.models.moe.hf_blocks import base_layer, use_grouped_experts

DENSE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")
SUPPORTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES
ROUTE_DTYPE = torch.int16  # expert ids as the route cache and Completion.routed_experts hold them

# Where the engine honours model.float32_logits. A CPU has no 16-bit matmul with a float32 output:
# upcasting the head each step cost 40% of bf16 CPU rollout throughput (132 -> 81 tokens/s).
FLOAT32_LOGITS_DEVICE_TYPES = {"cuda"}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedDecoder:
    """Runs a causal LM's modules over flat token batches. Holds no weights of its own."""

    def __init__(self, model: torch.nn.Module, *, float32_logits: bool = True) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        config = base.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise PosttrainError(
                f"the posttrain engine does not support model type {model_type!r} (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}). Use rollout.backend=hf, which runs any "
                "transformers causal LM, or add the family to posttrain/engine/paged_model.py (docs/engine.md)."
            )
        self.model = model
        self.config = config
        self.backbone = base.model
        self.lm_head = base.lm_head
        # A 16-bit copy of a head tied to the float32 embedding table (engine/weight_copies.py).
        self.head_weight: torch.Tensor | None = None
        # Float32 logits from a 16-bit head matmul, as the trainer computes them (model.float32_logits).
        self.float32_logits = float32_logits and isinstance(self.lm_head, torch.nn.Linear)
        self.layers = list(self.backbone.layers)
        self.mlps = [layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe for layer in self.layers]
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_layers = len(self.layers)
        # "head": Qwen3's norm of each head; "all": OLMoE's norm over all heads' projections.
        self.qk_norm = None if not hasattr(attn, "q_norm") else \
            "head" if attn.q_norm.weight.shape[0] == self.head_dim else "all"
        self.clip_qkv = getattr(config, "clip_qkv", None)  # OLMoE
        # GraniteMoE scales the embeddings, each residual branch and the logits.
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)
        self.logits_scaling = getattr(config, "logits_scaling", 1.0)
        self.sliding_window = self._sliding_window(config)
        # MoE: the sparse blocks on grouped experts (shared with the trainer when it shares the modules).
        self.moe = self._grouped_experts(model) if model_type in MOE_MODEL_TYPES else None
        self.is_moe_layer = [self.moe is not None and mlp in self.moe.blocks for mlp in self.mlps]
        self.num_moe_layers = self.moe.num_layers if self.moe is not None else 0
        self.top_k = config.num_experts_per_tok if self.moe is not None else 0
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.disable_compile()

    @staticmethod
    def _grouped_experts(model: torch.nn.Module):
        try:
            return use_grouped_experts(model)
        except PosttrainError as exc:
            raise PosttrainError(f"{exc} The posttrain engine runs MoE layers on grouped experts only; use "
                                 "rollout.backend=hf for this model.") from exc

    @staticmethod
    def _sliding_window(config) -> int | None:
        window = getattr(config, "sliding_window", None)
        if window is None:
            return None
        if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 carry a window they do not use
            return None
        return window

    @property
    def device(self) -> torch.device:
        return self.backbone.embed_tokens.weight.device

    @property
    def hidden_dtype(self) -> torch.dtype:
        return self.backbone.embed_tokens.weight.dtype

    def build_rope_tables(self, max_positions: int) -> None:
        """cos/sin for every position, computed by the model's own rotary module (so any rope
        scaling it implements applies), then looked up per token: no per-step recomputation."""
        if self.sliding_window is not None and self.sliding_window < max_positions:
            raise PosttrainError(
                f"this model uses sliding-window attention (window {self.sliding_window}) and sequences may reach "
                f"{max_positions} tokens; the posttrain engine attends to the whole context. Use rollout.backend=hf "
                f"or keep prompts plus rollout.max_new_tokens within {self.sliding_window} tokens."
            )
        positions = torch.arange(max_positions, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, max_positions, 1, device=self.device, dtype=self.hidden_dtype)
        cos, sin = self.backbone.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (positions, 1, head_dim)

    def enable_compile(self) -> None:
        """torch.compile the per-layer work around attention. A decode step of a small model is
        hundreds of tiny element-wise kernels (RMSNorm, rotary, SiLU, residuals); fused, a step
        runs several times faster. Attention, the cache writes and MoE blocks stay outside."""
        self._before_attention = torch.compile(_before_attention, dynamic=True, fullgraph=True)
        self._after_attention = torch.compile(_after_attention, dynamic=True, fullgraph=True)

    def disable_compile(self) -> None:
        self._before_attention, self._after_attention = _before_attention, _after_attention

    def graphable(self, compute_dtype: torch.dtype) -> bool:
        """Whether a decode step can be captured in a CUDA graph: MoE layers need the sync-free
        ``torch._grouped_mm`` path of the grouped experts (bf16 on compute capability 9.0+)."""
        if self.moe is None:
            return True
        probe = torch.empty(0, device=self.device)
        return all(grouped_mm_supported(probe, base_layer(block.experts).gate_up_proj, compute_dtype)  # under peft too
                   for block in self.moe.blocks)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata, attend: AttentionFn, route_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/positions: (num_tokens,) -> final hidden states (num_tokens, hidden).
        ``route_cache`` (num_moe_layers, num_slots, top_k): MoE models write each new token's
        expert ids at its slot (``meta.slot_mapping``)."""
        cos, sin = self.cos[positions], self.sin[positions]
        hidden = self.backbone.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        residual = self.residual_multiplier
        with self.moe.recording() if self.moe is not None else contextlib.nullcontext() as routes:
            for layer, mlp, is_moe, (k_cache, v_cache) in zip(self.layers, self.mlps, self.is_moe_layer, kv_caches):
                q, k, v = self._before_attention(layer, hidden, cos, sin, self.head_dim, self.qk_norm, self.clip_qkv)
                write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
                out = attend(q.to(k_cache.dtype), k_cache, v_cache, meta)
                hidden, x = self._after_attention(layer, None if is_moe else mlp, hidden, out, residual)
                if is_moe:  # grouped experts: eager (CUDA graphs still capture them)
                    hidden = hidden + _scaled(mlp(x), residual)
        if route_cache is not None:
            route_cache.index_copy_(1, meta.slot_mapping, torch.stack(routes).to(route_cache.dtype))
        return self.backbone.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden)
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if self.head_weight is not None and isinstance(self.lm_head, torch.nn.Linear):
            weight = self.head_weight
        if not self.float32_logits or hidden.device.type not in FLOAT32_LOGITS_DEVICE_TYPES:
            return self.lm_head(hidden) if weight is self.lm_head.weight else torch.nn.functional.linear(hidden, weight, bias)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else weight.dtype
        if dtype == torch.float32:
            return self.lm_head(hidden)
        logits = matmul_float32_out(hidden.to(dtype), weight.to(dtype).t())
        return logits if bias is None else logits + bias.to(dtype).float()


def _scaled(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    return x if multiplier == 1.0 else x * multiplier


def _before_attention(layer, hidden, cos, sin, head_dim: int, qk_norm: str | None, clip_qkv: float | None):
    """Input norm, q/k/v projections, optional q/k norms and clipping, rotary: (tokens, heads, head_dim) each."""
    num_tokens = hidden.shape[0]
    x = layer.input_layernorm(hidden)
    attn = layer.self_attn
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if qk_norm == "all":
        q, k = attn.q_norm(q), attn.k_norm(k)
    if clip_qkv is not None:
        q, k, v = (t.clamp(-clip_qkv, clip_qkv) for t in (q, k, v))
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    if qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _after_attention(layer, mlp, hidden, attn_out, residual: float):
    """Output projection and residual, then the MLP block and its residual. For an MoE layer
    (``mlp`` None) it stops before the block: returns the residual stream and the block's input."""
    hidden = hidden + _scaled(layer.self_attn.o_proj(attn_out.reshape(hidden.shape[0], -1)), residual)
    x = layer.post_attention_layernorm(hidden)
    if mlp is None:
        return hidden, x
    return hidden + _scaled(mlp(x), residual), None
