"""Expert parallelism: the experts of an MoE layer sharded over the ranks of an expert-parallel
(EP) group, tokens sent to the ranks that own their experts and the outputs sent back, with
``torch.distributed.all_to_all_single`` and uneven splits. See docs/moe.md ("Expert parallelism").

Rank ``r`` of an EP group of size ``ep`` owns the contiguous block of experts
``[r * E/ep, (r + 1) * E/ep)`` (:func:`expert_shard_range`). One MoE layer, per rank:

1. sort this rank's (token, expert) pairs by expert (:func:`sort_by_expert`): the pairs bound for
   each owner are then one contiguous block, owners in rank order;
2. exchange the per-expert pair counts (one all-to-all of ``E`` integers), which gives the split
   sizes of both directions and, on the owner, which local expert each received row is for;
3. all-to-all the pairs' hidden states to their owners (uneven splits);
4. the owner runs its local experts on what it received (:func:`grouped_experts` on local ids);
5. all-to-all the outputs back (the splits swapped): each rank gets exactly its rows, in the
   order it sent them;
6. weight by the routing weights and sum each token's ``k`` slots, as :func:`grouped_experts` does.

Gradients flow through both all-to-alls (:class:`_AllToAll`: the backward of an all-to-all is the
all-to-all with the splits swapped) to the hidden states, the routing weights and the local expert
weights. Collectives: every rank of the group must call :func:`expert_parallel_experts` for every
layer, also with no tokens, and backpropagate through its output whenever any rank does (the
backward runs the same two all-to-alls). The hidden states must require grad on all ranks of a
group or on none.

Also here: the EP process groups from :class:`~posttrain.distributed.layout.ParallelLayout`
(:func:`build_expert_groups`), ``moe.ep_mode`` as a pure function (:func:`resolve_ep_mode`), and
checkpoint helpers that gather the shards into the single-device (Hugging Face) layout and slice
it again (:func:`gather_expert_state_dict`, :func:`shard_expert_state_dict`).

Training runs use them through ``moe.ep_mode`` (:mod:`posttrain.models.moe.ep_training`).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.distributed.layout import ParallelLayout
from posttrain.errors import ConfigError
from posttrain.models.moe.grouped_experts import grouped_experts, sort_by_expert

EP_MODES = ("single", "ipc", "hybrid", "auto")
# transformers 5's stacked experts: ``...mlp.experts.gate_up_proj (E, 2I, H)``, ``...mlp.experts.down_proj (E, H, I)``.
EXPERT_PARAM_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")


# ---------------------------------------------------------------- the differentiable all-to-all


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits along dim 0; backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # What this rank received from rank j goes back to j: the splits swap roles.
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits,
                           group=group)
    return out


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of ``x`` along dim 0: ``input_splits[j]`` rows go to
    rank j of ``group``, ``output_splits[j]`` rows come from it (rank order). The gradient goes
    back along the same routes. (``torch.distributed.nn.functional.all_to_all_single`` does the
    same but is deprecated in torch 2.13.)"""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


# ---------------------------------------------------------------- the expert-parallel layer


def expert_shard_range(num_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """``(first, end)``: the experts rank ``ep_rank`` of an EP group of ``ep_size`` owns. Raises
    ConfigError when ``ep_size`` does not divide ``num_experts``."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must lie in [0, ep_size={ep_size})")
    if num_experts < 1 or num_experts % ep_size:
        divisors = [d for d in range(1, max(num_experts, 1) + 1) if num_experts % d == 0]
        raise ConfigError(f"expert parallelism: {num_experts} experts do not split evenly over {ep_size} "
                          f"expert-parallel ranks; every rank holds the same number of experts, so the EP size "
                          f"must be one of {divisors}.")
    per_rank = num_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def expert_parallel_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            local_gate_up: torch.Tensor, local_down: torch.Tensor, group: Any = None,
                            act_fn: Callable = F.silu, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """:func:`grouped_experts` with the experts sharded over the ranks of ``group`` (None: the
    default group). ``(T, H)``, equal to the single-device result for the same tokens.

    ``hidden (T, H)``, ``topk_ids (T, k)`` global expert ids in ``[0, E)``, ``topk_weights (T, k)``:
    this rank's tokens (T may differ between ranks, and be 0). ``local_gate_up (E/ep, 2I, H)`` and
    ``local_down (E/ep, H, I)``: this rank's experts, the block :func:`expert_shard_range` names.
    Every rank of ``group`` must call this collectively (see the module docstring)."""
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    local_experts = local_gate_up.shape[0]
    if local_down.shape[0] != local_experts:
        raise ValueError(f"local_gate_up holds {local_experts} experts but local_down {local_down.shape[0]}")
    num_experts = local_experts * ep_size
    num_tokens, top_k = topk_ids.shape
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}) ({local_experts} experts on each of {ep_size} "
                         f"ranks); got ids from {int(topk_ids.min())} to {int(topk_ids.max())} on EP rank {ep_rank}")

    order, counts = sort_by_expert(topk_ids, num_experts)  # counts (E,): pairs this rank sends to each expert
    # received[j * E_local + e]: pairs rank j sends to my local expert e (one all-to-all of E counts).
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    input_splits = counts.view(ep_size, local_experts).sum(1).tolist()
    output_splits = received.view(ep_size, local_experts).sum(1).tolist()

    x = all_to_all(hidden[order // top_k], output_splits, input_splits, group)  # grouped by source rank
    # Each received row's local expert: per source rank, its pairs come sorted by expert.
    local_ids = torch.arange(local_experts, device=received.device).repeat(ep_size).repeat_interleave(received)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    y = grouped_experts(x, local_ids.to(x.device).unsqueeze(1), ones, local_gate_up, local_down, act_fn,
                        use_grouped_mm=use_grouped_mm)
    if x.shape[0] == 0 and torch.is_grad_enabled():
        # No rows for these experts: keep the empty output connected to the received rows and the
        # weights, so that this rank runs both backward all-to-alls as the other ranks do (and its
        # expert weights get zero gradients, as on one device).
        tied = [t.sum() for t in (x, local_gate_up, local_down) if t.requires_grad]
        y = y + 0 * sum(tied).to(y.dtype) if tied else y
    y = all_to_all(y, input_splits, output_splits, group)  # back home, in the order sent
    y = y * topk_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    y = torch.zeros_like(y).index_copy(0, order, y)  # as grouped_experts: a permutation and a sum
    return y.view(num_tokens, top_k, y.shape[-1]).sum(1).to(hidden.dtype)


# ---------------------------------------------------------------- process groups and modes


@dataclass
class ExpertGroups:
    """This rank's expert-parallel group (the all-to-all) and expert data-parallel group (where
    each expert's gradients are averaged: the ranks holding the same experts), with their ranks."""

    ep_group: Any
    expert_dp_group: Any
    ep_ranks: list[int]
    expert_dp_ranks: list[int]

    @property
    def ep_size(self) -> int:
        return len(self.ep_ranks)

    @property
    def ep_rank(self) -> int:
        return self.ep_ranks.index(dist.get_rank())


def build_expert_groups(layout: ParallelLayout, timeout_s: float | None = None) -> ExpertGroups:
    """Create every EP and expert-DP group of ``layout`` (``layout.rank_groups('ep')`` and
    ``('expert_dp')``) and return this rank's. Collective: every rank of the default group must
    call it, with the same layout (``torch.distributed.new_group`` creates groups in order)."""
    if layout.world_size != dist.get_world_size():
        raise ConfigError(f"build_expert_groups: the layout is for {layout.world_size} ranks, but the process group "
                          f"has {dist.get_world_size()}.")
    rank = dist.get_rank()
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    mine: dict[str, tuple[Any, list[int]]] = {}
    for name in ("ep", "expert_dp"):
        for ranks in layout.rank_groups(name):
            group = dist.new_group(ranks, **kwargs)
            if rank in ranks:
                mine[name] = (group, ranks)
    return ExpertGroups(mine["ep"][0], mine["expert_dp"][0], mine["ep"][1], mine["expert_dp"][1])


def resolve_ep_mode(mode: str, world_size: int, gpus_per_node: int, num_experts: int) -> tuple[str, int]:
    """``moe.ep_mode`` -> ``(mode, ep_size)``, the mode ``auto`` resolves to and the size of each
    expert-parallel group; ConfigError for a mode these sizes cannot run.

    - ``single``: every rank holds all experts (ep 1); ranks are data parallel only.
    - ``ipc``: the experts sharded over all ranks, which must be the GPUs of one node
      (world_size <= gpus_per_node): ep = world_size.
    - ``hybrid``: EP inside each node, data parallel across nodes: ep = gpus_per_node, whole
      nodes only (gpus_per_node divides world_size). On one node it is ``ipc``.
    - ``auto``: ``single`` on one rank or with one expert; else the largest EP size that divides
      the number of experts and stays inside one node: ``ipc`` when that covers every rank,
      otherwise ``hybrid`` with that EP size (EP groups of consecutive ranks inside a node, data
      parallel across the groups), and ``single`` when no EP size above 1 fits.

    ``num_experts`` must split evenly over ep. Build the layout with
    ``ParallelLayout.from_world_size(world_size, ep=ep_size)``."""
    for name, value in [("world_size", world_size), ("gpus_per_node", gpus_per_node), ("num_experts", num_experts)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"moe.ep_mode: {name}={value!r} must be a positive integer.")
    if mode not in EP_MODES:
        raise ConfigError(f"moe.ep_mode={mode!r}: choose one of {', '.join(EP_MODES)}.")

    def check_experts(ep: int) -> None:
        if num_experts % ep:
            fits = [d for d in range(2, min(world_size, gpus_per_node) + 1) if world_size % d == 0 and num_experts % d == 0]
            raise ConfigError(f"moe.ep_mode={mode}: {num_experts} experts do not split evenly over ep={ep} ranks "
                              f"(every rank holds the same number of experts). "
                              + (f"EP sizes that would: {fits}; or " if fits else "") + "use moe.ep_mode=single.")

    if mode == "single":
        return "single", 1
    if mode == "ipc":
        if world_size > gpus_per_node:
            raise ConfigError(f"moe.ep_mode=ipc shards the experts over the GPUs of one node, but the run has "
                              f"{world_size} ranks and {gpus_per_node} GPUs per node; use moe.ep_mode=hybrid (EP "
                              "inside each node, data parallel across nodes) or auto.")
        check_experts(world_size)
        return "ipc", world_size
    if mode == "hybrid":
        if world_size % gpus_per_node:
            raise ConfigError(f"moe.ep_mode=hybrid runs EP inside each node of {gpus_per_node} GPUs, so the "
                              f"world size must be whole nodes; {world_size} ranks is not a multiple of "
                              f"{gpus_per_node}. Use moe.ep_mode=ipc on one node, or auto.")
        check_experts(gpus_per_node)
        return "hybrid", gpus_per_node
    # auto
    if world_size == 1 or num_experts == 1:
        return "single", 1
    ep = math.gcd(world_size, num_experts) if world_size <= gpus_per_node else math.gcd(world_size, gpus_per_node, num_experts)
    if ep == 1:
        return "single", 1
    return ("ipc" if ep == world_size else "hybrid"), ep


def gpus_per_node(world_size: int) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE (every posttrain launch is one node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def ep_mode_problems(ep_mode: str, world_size: int, num_experts: int | None) -> list[str]:
    """Config problems of ``moe.ep_mode`` for a run of ``world_size`` processes; ``num_experts``
    when known before the model loads (moe.random_init), else None (checked once it loads)."""
    if ep_mode in ("ipc", "hybrid") and world_size == 1:
        return [(f"moe.ep_mode={ep_mode} splits the experts over the training processes, but this run has one; "
                 "set trainer.num_processes to the number of GPUs (e.g. 2), or moe.ep_mode=single (or auto).")]
    if num_experts is None or world_size == 1:
        return []
    try:
        resolve_ep_mode(ep_mode, world_size, gpus_per_node(world_size), num_experts)
    except ConfigError as exc:
        return [str(exc)]
    return []


# ---------------------------------------------------------------- checkpoints (Hugging Face layout)


def is_expert_param(name: str) -> bool:
    """Whether ``name`` is a stacked expert weight (transformers 5 names), the tensors EP shards."""
    return name.endswith(EXPERT_PARAM_SUFFIXES)


def shard_experts(full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """This rank's block of a full ``(E, ...)`` expert tensor (a copy, contiguous)."""
    first, end = expert_shard_range(full.shape[0], ep_rank, ep_size)
    return full[first:end].clone()


def gather_experts(local: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The full ``(E, ...)`` tensor from every rank's ``(E/ep, ...)`` block (collective over
    ``group``; every rank gets it)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)


def gather_expert_state_dict(state: dict[str, torch.Tensor], group: Any = None,
                             is_expert: Callable[[str], bool] = is_expert_param) -> dict[str, torch.Tensor]:
    """An EP rank's state dict -> the single-device one (Hugging Face layout, full ``(E, ...)``
    expert tensors), on every rank. Collective over ``group``: every rank passes the same names
    (in the same order). Other tensors are returned as they are."""
    return {name: gather_experts(tensor, group) if is_expert(name) else tensor for name, tensor in state.items()}


def shard_expert_state_dict(state: dict[str, torch.Tensor], ep_rank: int, ep_size: int,
                            is_expert: Callable[[str], bool] = is_expert_param) -> dict[str, torch.Tensor]:
    """The single-device state dict -> EP rank ``ep_rank``'s: expert tensors sliced to its block,
    others returned as they are. No communication (each rank slices what it loaded)."""
    return {name: shard_experts(tensor, ep_rank, ep_size) if is_expert(name) else tensor
            for name, tensor in state.items()}


def expert_names(names: Iterable[str]) -> list[str]:
    """The expert tensors among ``names`` (e.g. a model's ``state_dict()`` keys)."""
    return [name for name in names if is_expert_param(name)]
