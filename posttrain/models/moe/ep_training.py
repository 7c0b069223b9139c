"""Expert parallelism in a training run (``moe.ep_mode``): the policy's MoE blocks on the
all-to-all experts of :mod:`posttrain.models.moe.expert_parallel`, composed with FSDP2.

:func:`apply_expert_parallel` (called by ``prepare_for_training`` before FSDP2 shards the model)
replaces each stacked experts module's ``gate_up_proj``/``down_proj`` with a ``DTensor``
``Shard(0)`` over the EP dimension of a 2-D device mesh ``(expert_dp, ep)`` built from
:class:`~posttrain.distributed.layout.ParallelLayout` (EP groups of consecutive ranks; the ranks
holding the same experts form ``expert_dp``), as torchtitan does. :func:`posttrain.distributed.fsdp.
shard_model` then shards each experts module with FSDP2 over ``expert_dp`` only (the other weights
over all ranks). The all-to-all's backward sums each expert's gradient over the EP group; the
experts' forward divides it by the EP size and FSDP2 averages over ``expert_dp``, so it ends as
the mean over all ranks like every other gradient (no custom reduce op: gloo has none, and
torchtitan's ``set_gradient_divide_factor`` needs one). Because the expert
weights are DTensors of the full ``(E, ...)`` shape, the sharded checkpoint, its Hugging Face
export, the full state dict and the weight push to engine replicas all see the single-device
layout with no special case.

Generation (``gathered_for_generation``: ranks generate different lengths, or rank 0 alone) must
run without collectives: there each experts module holds its full weights (one all-gather over
the EP group on entry) and computes its tokens locally with :func:`grouped_experts`.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from posttrain.distributed.layout import ParallelLayout
from posttrain.distributed.process_group import get_rank, get_world_size
from posttrain.errors import ConfigError
from posttrain.models.moe import moe_shape
from posttrain.models.moe.expert_parallel import (
    expert_parallel_experts,
    gpus_per_node,
    resolve_ep_mode,
    shard_experts,
)
from posttrain.models.moe.grouped_experts import grouped_experts
from posttrain.models.moe.hf_blocks import base_layer, use_grouped_experts

logger = logging.getLogger("posttrain.moe")

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


class ExpertParallel:
    """What one experts module needs for EP: its group, the mesh FSDP2 shards it over, and the
    full weights while generating (see the module docstring)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.ep_group = mesh.get_group("ep")
        self.ep_size = mesh.size(mesh.mesh_dim_names.index("ep"))
        self.fsdp_mesh = mesh["expert_dp"]
        self.full_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def gather(self, experts: torch.nn.Module) -> None:
        """Full ``(E, ...)`` weights for collective-free forwards (all ranks call it together)."""
        self.full_weights = tuple(_full(getattr(experts, name)) for name in EXPERT_WEIGHTS)

    def release(self) -> None:
        self.full_weights = None


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param  # differentiable


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (exact values forward, unlike ``x * s``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@torch.compiler.disable  # trainer.compile_layers: host syncs and collectives stay out of the compiled graph
def ep_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward of an expert-parallel experts module (transformers' arguments): all-to-all to
    the experts' owners and back, or, while generating, the full weights on this rank alone."""
    ep: ExpertParallel = self.expert_parallel
    if ep.full_weights is not None:
        return grouped_experts(hidden_states, top_k_index, top_k_weights, *ep.full_weights, self.act_fn)
    # The all-to-all's backward sums each expert's gradient over the EP group; / ep here and FSDP2's
    # mean over expert_dp make it the mean over all ranks, like every other gradient.
    gate_up, down = (_ScaleGrad.apply(_local(w), 1.0 / ep.ep_size) for w in (self.gate_up_proj, self.down_proj))
    return expert_parallel_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, ep.ep_group, self.act_fn)


def expert_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    """The ``(expert_dp, ep)`` device mesh of ``layout``: row i is its i-th EP group, each column
    an expert data-parallel group. Collective (every rank builds every group)."""
    ranks = torch.tensor(layout.rank_groups("ep"))  # (expert_dp, ep)
    if sorted(ranks.T.tolist()) != sorted(layout.rank_groups("expert_dp")):
        raise ConfigError(f"expert parallelism with tp/pp/cp > 1 is not supported in training yet: {layout}.")
    return DeviceMesh(device_type, ranks, mesh_dim_names=("expert_dp", "ep"))


def apply_expert_parallel(model: torch.nn.Module, ep_mode: str, device: torch.device) -> int:
    """Put an MoE ``model``'s experts on expert parallelism as ``ep_mode`` resolves for this run
    (call on every rank, before FSDP2 sharding and the optimizer); returns the EP size (1: nothing
    changed, e.g. ``single``, one process or a dense model). ConfigError when the experts do not
    split over the processes, naming the sizes that would."""
    shape = moe_shape(model)
    world = get_world_size()
    if shape is None or ep_mode == "single" or world == 1:
        return 1
    mode, ep_size = resolve_ep_mode(ep_mode, world, gpus_per_node(world), shape.num_experts)
    if ep_size == 1:
        logger.info("moe.ep_mode=%s: no expert-parallel size above 1 fits %d experts on %d processes; every "
                    "process holds all experts", ep_mode, shape.num_experts, world)
        return 1
    mesh = expert_mesh(ParallelLayout.from_world_size(world, ep=ep_size), device.type)
    ep_rank = mesh.get_local_rank("ep")
    moe = use_grouped_experts(model)
    for block in moe.blocks:
        experts = block.experts
        if experts is not base_layer(experts):
            raise ConfigError("moe.ep_mode with LoRA adapters on the experts is not supported; use moe.ep_mode=single.")
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            local = DTensor.from_local(shard_experts(full.detach(), ep_rank, ep_size), mesh["ep"], [Shard(0)],
                                       run_check=False)
            setattr(experts, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))
        experts.expert_parallel = ExpertParallel(mesh)
        experts.forward = types.MethodType(ep_experts_forward, experts)
    if get_rank() == 0:
        logger.info("moe.ep_mode=%s: experts split over expert-parallel groups of %d processes (%d experts each, "
                    "%d MoE layers); other weights sharded over all %d processes", mode, ep_size,
                    shape.num_experts // ep_size, moe.num_layers, world)
    return ep_size

