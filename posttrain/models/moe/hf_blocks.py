"""transformers' sparse MoE blocks on posttrain's grouped experts, with a record and replay hook
for the routes.

:func:`use_grouped_experts` rebinds the ``forward`` of every sparse MoE block of a loaded model
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE) to :func:`grouped_moe_forward`. Parameters,
module names and the state dict are untouched, so optimizers, checkpoints, LoRA on the other
weights and the router hooks of :mod:`posttrain.models.moe` (losses, metrics, float32 routers)
work as before: the block still calls its own router module.

Routes: inside :meth:`GroupedMoE.recording` each layer's chosen expert ids ``(T, k)`` are kept;
inside :meth:`GroupedMoE.replaying` each layer uses given ids instead of its router's top-k, while
the routing weights still come from the softmax over the *current* router logits (gathered at the
given ids and renormalised as the family does), so the router keeps its gradient. That is rollout
routing replay (R3): record in the engine, replay in the trainer.

fp8 experts (``moe.expert_dtype=fp8``): inside :meth:`GroupedMoE.using_fp8` each layer computes
its experts from given e4m3 weights (:mod:`posttrain.models.moe.fp8_experts`), so the engine can
run quantized experts on modules it shares with the trainer, whose forwards stay full precision.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from posttrain.errors import PosttrainError
from posttrain.models.moe import find_routers
from posttrain.models.moe.fp8_experts import (
    FP8Experts,
    fp8_grouped_experts,
    quantize_experts,
)
from posttrain.models.moe.grouped_experts import grouped_experts


@dataclass(frozen=True)
class MoEFamily:
    """How one family's sparse MoE block routes (read from transformers' modeling_*.py)."""

    name: str
    router: str  # the block's attribute holding the router module
    renormalize: bool | None  # top-k weights rescaled to sum to 1; None: the router's norm_topk_prob
    float32_weights: bool  # routing weights stay float32 (Mixtral) instead of the router logits' dtype
    shared_expert: bool = False  # Qwen2-MoE: + sigmoid(shared_expert_gate(x)) * shared_expert(x)


# Sparse MoE block class name -> its routing. GraniteMoE takes the softmax over the top-k logits,
# which is the full softmax renormalised over the top-k.
FAMILIES = {
    "MixtralSparseMoeBlock": MoEFamily("Mixtral", "gate", True, True),
    "Qwen2MoeSparseMoeBlock": MoEFamily("Qwen2-MoE", "gate", None, False, shared_expert=True),
    "Qwen3MoeSparseMoeBlock": MoEFamily("Qwen3-MoE", "gate", None, False),
    "OlmoeSparseMoeBlock": MoEFamily("OLMoE", "gate", None, False),
    "GraniteMoeMoE": MoEFamily("GraniteMoE", "router", True, False),
}


def replay_weights(router_logits: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """Routing weights ``(T, k)`` of given expert ids ``(T, k)`` under ``router_logits (T, E)``: the
    float32 softmax over all experts gathered at the ids, renormalised to sum to 1 if asked. For a
    router's own top-k ids this equals its own weights (tested per family)."""
    weights = torch.softmax(router_logits.float(), dim=-1).gather(-1, topk_ids.long())
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(dtype)


class GroupedMoE:
    """The MoE blocks of one model on grouped experts, in layer order; see the module docstring."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.blocks = blocks
        self._recorded: list[torch.Tensor | None] | None = None
        self._record_router_choice = False
        self._replay: Sequence[torch.Tensor] | None = None
        self._fp8: Sequence[FP8Experts] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @contextlib.contextmanager
    def recording(self, router_choice: bool = False) -> Iterator[list[torch.Tensor | None]]:
        """A list with one entry per MoE layer that each forward inside sets to the layer's expert
        ids ``(T, k)`` long (detached; T = batch x sequence positions, row-major). Meant for one
        forward pass: a second one overwrites it (so does the recomputation of gradient
        checkpointing, with the same ids). The ids are those the layer used; with
        ``router_choice``, the router's own top-k instead, which differ only under
        :meth:`replaying` (how far the router has drifted from the replayed routes)."""
        self._recorded = [None] * self.num_layers
        self._record_router_choice = router_choice
        try:
            yield self._recorded
        finally:
            self._recorded, self._record_router_choice = None, False

    @contextlib.contextmanager
    def replaying(self, topk_ids: Sequence[torch.Tensor]) -> Iterator[None]:
        """Every forward inside routes layer i's tokens to ``topk_ids[i] (T, k)`` (any integer dtype,
        e.g. what :meth:`recording` gave) instead of its router's top-k. Keep it open around the
        backward pass too when gradient checkpointing recomputes the blocks there."""
        if len(topk_ids) != self.num_layers:
            raise PosttrainError(f"router replay got expert ids of {len(topk_ids)} layers; the model has "
                                 f"{self.num_layers} MoE layers.")
        self._replay = topk_ids
        try:
            yield
        finally:
            self._replay = None

    def quantize_fp8(self) -> list[FP8Experts]:
        """Every layer's experts as e4m3 weights with per-output-channel scales (read from the
        current weights; call again after they change). Refused for experts under a peft wrapper:
        the adapters would be left out."""
        layers = []
        for block in self.blocks:
            experts = base_layer(block.experts)
            if experts is not block.experts:
                raise PosttrainError("fp8 experts (moe.expert_dtype=fp8) with LoRA adapters on the experts are not "
                                     "supported: the adapters would be left out; use moe.expert_dtype=auto.")
            layers.append(quantize_experts(experts.gate_up_proj, experts.down_proj))
        return layers

    @contextlib.contextmanager
    def using_fp8(self, experts: Sequence[FP8Experts]) -> Iterator[None]:
        """Every forward inside computes layer i's experts from ``experts[i]`` (no gradients), e.g.
        the engine's rollouts, while forwards outside (the trainer's) keep the modules' weights."""
        if len(experts) != self.num_layers:
            raise PosttrainError(f"got fp8 experts of {len(experts)} layers; the model has {self.num_layers} MoE layers.")
        self._fp8 = experts
        try:
            yield
        finally:
            self._fp8 = None

    def restore(self) -> None:
        """Give every block back transformers' own forward."""
        for block in self.blocks:
            del block.forward, block.grouped_moe, block.moe_layer_index, base_layer(block.experts).forward


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The module a peft wrapper holds (LoRA on a router's or the experts' parameters, ``ParamWrapper``,
    possibly nested), or ``module`` itself."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def grouped_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward of a stacked experts module (bound by :func:`use_grouped_experts`), with
    transformers' arguments. Called through the module, so a peft wrapper around it applies LoRA to
    the weights read here (it parametrizes them for the call)."""
    return grouped_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn)


def grouped_moe_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward of a sparse MoE block (bound by :func:`use_grouped_experts`): ``(B, L, H)`` in
    and out, equal to the family's own forward."""
    moe: GroupedMoE = self.grouped_moe
    layer = self.moe_layer_index
    family = FAMILIES[type(self).__name__]
    shape = hidden_states.shape
    if self.training and getattr(self, "jitter_noise", 0) > 0:  # Mixtral's multiplicative router noise
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    x = hidden_states.reshape(-1, shape[-1])
    router = getattr(self, family.router)
    logits, weights, ids = router(x)
    router_ids = ids
    if moe._replay is not None:
        ids = moe._replay[layer].to(device=x.device, dtype=torch.long)
        if ids.shape != weights.shape:
            raise PosttrainError(f"router replay: MoE layer {layer} got expert ids of shape {tuple(ids.shape)} for "
                                 f"{x.shape[0]} tokens; it routes (tokens, top_k) = {tuple(weights.shape)}.")
        renormalize = family.renormalize if family.renormalize is not None else base_layer(router).norm_topk_prob
        weights = replay_weights(logits, ids, renormalize, torch.float32 if family.float32_weights else logits.dtype)
    if moe._recorded is not None:
        moe._recorded[layer] = (router_ids if moe._record_router_choice else ids).detach()
    if moe._fp8 is not None:
        out = fp8_grouped_experts(x, ids, weights, moe._fp8[layer], base_layer(self.experts).act_fn)
    else:
        out = self.experts(x, ids, weights)  # grouped_experts_forward, through any peft wrapper
    if family.shared_expert:
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return out.reshape(shape)


def _check_experts(block: torch.nn.Module, name: str) -> None:
    experts = getattr(block, "experts", None)
    experts = base_layer(experts) if isinstance(experts, torch.nn.Module) else experts
    layout = {"has_gate": True, "is_concatenated": True, "has_bias": False, "is_transposed": False,
              "has_post_expert_norm": False, "_is_expert_parallel": False}
    odd = [key for key, value in layout.items() if getattr(experts, key, value) != value]
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if odd or not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 \
            or down.dim() != 3 or down.shape[2] * 2 != gate_up.shape[1] or not callable(getattr(experts, "act_fn", None)):
        raise PosttrainError(f"{name}: grouped experts need transformers' stacked SwiGLU experts (gate_up_proj "
                             f"(E, 2I, H), down_proj (E, H, I), no bias, not expert-parallel); this block's experts "
                             f"differ ({', '.join(odd) or 'weights'}). Is transformers older than 5?")


def use_grouped_experts(model: torch.nn.Module) -> GroupedMoE:
    """Run every sparse MoE block of ``model`` (a transformers causal LM, or a peft model around
    one) on grouped experts; returns the handle for recording and replaying routes. A model that is
    already on grouped experts returns its handle; a dense model returns one with no layers.

    Raises PosttrainError for an MoE family other than Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
    GraniteMoE, or experts stored another way."""
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ in FAMILIES]
    if blocks and isinstance(getattr(blocks[0][1], "grouped_moe", None), GroupedMoE):
        return blocks[0][1].grouped_moe
    routers, _ = find_routers(model)
    if len(routers) != len(blocks):
        raise PosttrainError(f"{type(model).__name__} has {len(routers)} MoE routers but {len(blocks)} sparse MoE "
                             f"blocks of the families posttrain's grouped experts support "
                             f"({', '.join(f.name for f in FAMILIES.values())}).")
    for name, block in blocks:
        _check_experts(block, name)
    moe = GroupedMoE([block for _, block in blocks])
    for layer, block in enumerate(moe.blocks):
        # Plain attributes (not submodules): the state dict is unchanged. Bound per module, so
        # copy.deepcopy (the KL reference) binds the copy's forward to the copy.
        block.grouped_moe, block.moe_layer_index = moe, layer
        block.forward = types.MethodType(grouped_moe_forward, block)
        experts = base_layer(block.experts)
        experts.forward = types.MethodType(grouped_experts_forward, experts)
    return moe
