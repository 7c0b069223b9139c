"""Expert parallelism on 2 and 4 gloo ranks (CPU): outputs and gradients (hidden states, routing
weights, expert weights gathered) equal the single-process grouped experts on the same tokens,
for top-1 and top-2 routing, with an expert that receives no tokens, a rank that sends nothing to
the other ranks, and a rank with no tokens at all; EP inside groups of 2 with data parallelism
across them (4 ranks, ``hybrid``); the checkpoint gather/slice round trip. Tolerance: float32,
atol 1e-5 and rtol 1e-5 (the only difference is the order of the additions inside each matmul).

One spawn per world size runs every case (processes cost seconds each to start)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed.ranks import run_on_ranks
from posttrain.distributed.layout import ParallelLayout
from posttrain.errors import ConfigError
from posttrain.models.moe.expert_parallel import (
    build_expert_groups,
    expert_parallel_experts,
    expert_shard_range,
    gather_expert_state_dict,
    gather_experts,
    resolve_ep_mode,
    shard_expert_state_dict,
    shard_experts,
)
from posttrain.models.moe.grouped_experts import grouped_experts

NUM_EXPERTS, HIDDEN, INTERMEDIATE = 8, 16, 8
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# case -> (top_k, tokens per rank, experts never routed to, rank 0 routes only to its own experts
# and the last rank has no tokens)
CASES = {
    "top1": (1, [6, 3, 5, 4], [], False),
    "top2": (2, [5, 7, 2, 6], [], False),
    "top2_unused_experts": (2, [4, 6, 5, 3], [1, 6], False),
    "top2_rank0_local_last_rank_empty": (2, [6, 5, 4, 3], [], True),
}


def make_case(case: str, world_size: int, ep_size: int) -> dict:
    """Every rank's tokens and the full experts, the same on every rank (seeded by the case)."""
    top_k, tokens, unused, local_only = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)) + world_size)
    experts = {"gate_up": torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=g) * 0.3,
               "down": torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=g) * 0.3}
    ranks = []
    for rank in range(world_size):
        t = 0 if local_only and rank == world_size - 1 else tokens[rank]
        logits = torch.randn(t, NUM_EXPERTS, generator=g)
        logits[:, unused] = float("-inf")
        if local_only and rank == 0:  # only the experts rank 0 owns in its EP group
            first, end = expert_shard_range(NUM_EXPERTS, 0, ep_size)
            logits[:, :first] = logits[:, end:] = float("-inf")
        weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        ranks.append({"hidden": torch.randn(t, HIDDEN, generator=g), "ids": ids, "weights": weights,
                      "probe": torch.randn(t, HIDDEN, generator=g)})
    return {"experts": experts, "ranks": ranks}


def ep_rank_job(rank: int, world_size: int, workdir: str) -> None:
    """Every case with EP over all ranks; with 4 ranks also EP groups of 2 (data parallel across
    them); then the checkpoint round trip. Rank r saves what it computed."""
    results = {}
    layouts = {"ipc": ParallelLayout.from_world_size(world_size, ep=world_size)}
    if world_size == 4:
        layouts["hybrid"] = ParallelLayout.from_world_size(world_size, ep=2)
    for layout_name, layout in layouts.items():
        groups = build_expert_groups(layout, timeout_s=60)
        for case in CASES:
            data = make_case(case, world_size, groups.ep_size)
            mine = {k: v.clone().requires_grad_(k in ("hidden", "weights")) for k, v in data["ranks"][rank].items()}
            gate_up = shard_experts(data["experts"]["gate_up"], groups.ep_rank, groups.ep_size).requires_grad_()
            down = shard_experts(data["experts"]["down"], groups.ep_rank, groups.ep_size).requires_grad_()
            out = expert_parallel_experts(mine["hidden"], mine["ids"], mine["weights"], gate_up, down, groups.ep_group)
            (out * mine["probe"]).sum().backward()
            # Each expert's gradient: gathered over its EP group, summed over the ranks holding it.
            full_grads = [gather_experts(p.grad, groups.ep_group) for p in (gate_up, down)]
            for grad in full_grads:
                dist.all_reduce(grad, group=groups.expert_dp_group)
            results[(layout_name, case)] = {"out": out.detach(), "hidden_grad": mine["hidden"].grad,
                                            "weights_grad": mine["weights"].grad, "gate_up_grad": full_grads[0],
                                            "down_grad": full_grads[1], "ep_ranks": groups.ep_ranks,
                                            "expert_dp_ranks": groups.expert_dp_ranks}

    # Checkpoint: the shards gather to the single-device state dict, which slices back to them.
    full = make_case("top2", world_size, world_size)["experts"]
    state = {"model.embed_tokens.weight": torch.arange(6.0).view(2, 3),
             "model.layers.0.mlp.experts.gate_up_proj": shard_experts(full["gate_up"], rank, world_size),
             "model.layers.0.mlp.experts.down_proj": shard_experts(full["down"], rank, world_size)}
    gathered = gather_expert_state_dict(state)
    sliced = shard_expert_state_dict(gathered, rank, world_size)
    results["checkpoint"] = {"gathered": gathered, "round_trip": all(torch.equal(sliced[k], state[k]) for k in state)}
    torch.save(results, f"{workdir}/rank{rank}.pt")


def reference(data: dict, ranks: list[int]) -> dict:
    """One process, all experts, the tokens of ``ranks``: outputs and gradients per rank, and the
    expert weights' gradients of the summed loss."""
    gate_up = data["experts"]["gate_up"].clone().requires_grad_()
    down = data["experts"]["down"].clone().requires_grad_()
    per_rank = {}
    for rank in ranks:
        mine = {k: v.clone().requires_grad_(k in ("hidden", "weights")) for k, v in data["ranks"][rank].items()}
        out = grouped_experts(mine["hidden"], mine["ids"], mine["weights"], gate_up, down)
        (out * mine["probe"]).sum().backward()
        # A rank without tokens: grouped_experts leaves the empty hidden states without a gradient.
        grads = {f"{k}_grad": mine[k].grad if mine[k].grad is not None else torch.zeros_like(mine[k])
                 for k in ("hidden", "weights")}
        per_rank[rank] = {"out": out.detach(), **grads}
    return {"ranks": per_rank, "gate_up_grad": gate_up.grad, "down_grad": down.grad}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ep_run(request, tmp_path_factory):
    world_size = request.param
    workdir = tmp_path_factory.mktemp(f"ep{world_size}")
    run_on_ranks(ep_rank_job, str(workdir), world_size=world_size, timeout_s=90)
    return world_size, [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.mark.parametrize("case", list(CASES))
def test_ep_equals_single_device(ep_run, case):
    world_size, results = ep_run
    data = make_case(case, world_size, world_size)
    ref = reference(data, list(range(world_size)))
    for rank in range(world_size):
        got, want = results[rank][("ipc", case)], ref["ranks"][rank]
        assert got["ep_ranks"] == list(range(world_size))
        for key in ("out", "hidden_grad", "weights_grad"):
            torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=f"rank {rank} {key}")
        for key in ("gate_up_grad", "down_grad"):
            torch.testing.assert_close(got[key], ref[key], **TOLERANCE, msg=f"rank {rank} {key}")
    if CASES[case][2]:  # experts nobody routes to: zero gradient, as on one device
        assert not results[0][("ipc", case)]["gate_up_grad"][CASES[case][2]].any()
    if CASES[case][3]:
        assert results[world_size - 1][("ipc", case)]["out"].shape == (0, HIDDEN)


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_ep_groups_with_data_parallel_across(ep_run, case):
    """4 ranks: EP groups {0,1} and {2,3}, expert-DP groups {0,2} and {1,3}. Each EP group equals
    one device on its own tokens; expert gradients summed over expert-DP equal the whole batch's."""
    world_size, results = ep_run
    if world_size != 4:
        pytest.skip("hybrid needs 4 ranks")
    data = make_case(case, world_size, 2)
    ref = reference(data, [0, 1, 2, 3])
    for rank in range(4):
        got = results[rank][("hybrid", case)]
        assert got["ep_ranks"] == ([0, 1] if rank < 2 else [2, 3]) and got["expert_dp_ranks"] == [rank % 2, rank % 2 + 2]
        for key in ("out", "hidden_grad", "weights_grad"):
            torch.testing.assert_close(got[key], ref["ranks"][rank][key], **TOLERANCE, msg=f"rank {rank} {key}")
        for key in ("gate_up_grad", "down_grad"):
            torch.testing.assert_close(got[key], ref[key], **TOLERANCE, msg=f"rank {rank} {key}")


def test_checkpoint_gathers_the_single_device_layout_and_slices_back(ep_run):
    world_size, results = ep_run
    full = make_case("top2", world_size, world_size)["experts"]
    for rank in range(world_size):
        ckpt = results[rank]["checkpoint"]
        assert ckpt["round_trip"]
        assert torch.equal(ckpt["gathered"]["model.layers.0.mlp.experts.gate_up_proj"], full["gate_up"])
        assert torch.equal(ckpt["gathered"]["model.layers.0.mlp.experts.down_proj"], full["down"])
        assert torch.equal(ckpt["gathered"]["model.embed_tokens.weight"], torch.arange(6.0).view(2, 3))


# ---------------------------------------------------------------- pure functions (no processes)


def test_shard_range_and_uneven_split_error():
    assert [expert_shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ConfigError, match=r"6 experts do not split evenly over 4 .* one of \[1, 2, 3, 6\]"):
        expert_shard_range(6, 0, 4)
    state = {"a.mlp.experts.down_proj": torch.arange(8.0).view(4, 2), "a.norm.weight": torch.ones(3)}
    sliced = shard_expert_state_dict(state, 1, 2)
    assert torch.equal(sliced["a.mlp.experts.down_proj"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert sliced["a.norm.weight"] is state["a.norm.weight"]


@pytest.mark.parametrize("mode, world, per_node, experts, expected", [
    ("single", 8, 8, 64, ("single", 1)),
    ("ipc", 2, 8, 64, ("ipc", 2)),
    ("ipc", 8, 8, 64, ("ipc", 8)),
    ("hybrid", 16, 8, 64, ("hybrid", 8)),
    ("hybrid", 8, 8, 64, ("hybrid", 8)),
    ("auto", 1, 8, 64, ("single", 1)),
    ("auto", 4, 8, 64, ("ipc", 4)),
    ("auto", 16, 8, 128, ("hybrid", 8)),
    ("auto", 6, 8, 4, ("hybrid", 2)),  # 4 experts over 6 ranks: EP groups of 2, DP over 3
    ("auto", 4, 8, 1, ("single", 1)),
    ("auto", 3, 8, 8, ("single", 1)),  # no EP size above 1 divides both
])
def test_resolve_ep_mode(mode, world, per_node, experts, expected):
    assert resolve_ep_mode(mode, world, per_node, experts) == expected
    ParallelLayout.from_world_size(world, ep=expected[1])  # a layout these sizes can build


@pytest.mark.parametrize("args, message", [
    (("ipc", 16, 8, 64), r"ipc .* 16 ranks and 8 GPUs per node; use moe.ep_mode=hybrid"),
    (("ipc", 4, 8, 6), r"6 experts do not split evenly over ep=4 .* EP sizes that would: \[2\]"),
    (("hybrid", 12, 8, 64), r"12 ranks is not a multiple of 8"),
    (("hybrid", 16, 8, 12), r"12 experts do not split evenly over ep=8"),
    (("expert", 2, 8, 8), r"moe.ep_mode='expert': choose one of single, ipc, hybrid, auto"),
    (("auto", 0, 8, 8), r"world_size=0 must be a positive integer"),
])
def test_resolve_ep_mode_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        resolve_ep_mode(*args)
