"""ParallelLayout: Megatron-LM's rank groups, divisibility errors, the table, and the emitted
Megatron flags and DeepSpeed config."""

from __future__ import annotations

import pytest

from posttrain.config.schema import MoERouterConfig
from posttrain.distributed import ParallelLayout
from posttrain.errors import ConfigError


def test_megatron_docstring_example_16_ranks_tp2_pp4():
    # The example in Megatron core's initialize_model_parallel docstring.
    layout = ParallelLayout.from_world_size(16, tp=2, pp=4)
    assert layout.dp == 2
    assert layout.rank_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.rank_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert layout.rank_groups("pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def test_expert_groups_split_the_data_parallel_ranks():
    layout = ParallelLayout.from_world_size(8, tp=2, ep=2)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    # Experts: tp fastest, then ep over the data-parallel positions of one tp index.
    assert layout.rank_groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.rank_groups("expert_dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.rank_groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_context_parallel_sits_between_tp_and_dp_and_ep_spans_cp_and_dp():
    layout = ParallelLayout.from_world_size(8, tp=2, cp=2, ep=4)
    assert layout.dp == 2 and layout.expert_dp == 1
    assert layout.rank_groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.rank_groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.rank_groups("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.rank_groups("ep") == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("world,sizes", [
    (1, {}), (8, {"tp": 8}), (16, {"tp": 2, "pp": 2, "ep": 4}), (24, {"tp": 2, "cp": 3, "ep": 2}),
    (32, {"tp": 4, "pp": 2, "cp": 2, "ep": 2}), (12, {"pp": 3, "ep": 4}),
])
def test_every_kind_of_group_partitions_the_world(world, sizes):
    layout = ParallelLayout.from_world_size(world, **sizes)
    expected_size = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "dp_cp": layout.dp * layout.cp,
                     "pp": layout.pp, "ep": layout.ep, "expert_dp": layout.expert_dp}
    for name, size in expected_size.items():
        groups = layout.rank_groups(name)
        assert sorted(r for g in groups for r in g) == list(range(world)), name
        assert all(len(g) == size for g in groups), name
    # Dense and expert groups cover the same model-parallel slice: ep x expert_dp == dp x cp.
    assert layout.ep * layout.expert_dp == layout.dp * layout.cp
    # A tp group and a dp group share at most one rank (orthogonal dimensions).
    for tp_group in layout.rank_groups("tp"):
        for dp_group in layout.rank_groups("dp"):
            assert len(set(tp_group) & set(dp_group)) <= 1


def test_coordinates_give_each_ranks_index_in_its_groups():
    layout = ParallelLayout.from_world_size(16, tp=2, pp=4)
    # rank = tp + 2 * (dp + 2 * pp): 5 = 1 + 2 * (0 + 2 * 1)
    assert layout.coordinates(5) == {"tp": 1, "cp": 0, "dp": 0, "dp_cp": 0, "pp": 1, "ep": 0, "expert_dp": 0}
    assert layout.coordinates(7)["dp"] == 1
    with pytest.raises(ValueError):
        layout.coordinates(16)


def test_sizes_that_do_not_divide_name_the_sizes_that_would():
    with pytest.raises(ConfigError, match=r"tp x pp x cp = 2 x 3 x 1 = 6 does not divide world_size=16.*\[1, 2, 4, 8, 16\]"):
        ParallelLayout.from_world_size(16, tp=2, pp=3)
    with pytest.raises(ConfigError, match=r"ep=3 does not divide dp x cp = 4 x 1 = 4.*\[1, 2, 4\]"):
        ParallelLayout.from_world_size(8, tp=2, ep=3)
    with pytest.raises(ConfigError, match=r"tp=0 must be a positive integer"):
        ParallelLayout.from_world_size(8, tp=0)
    layout = ParallelLayout.from_world_size(8, ep=4)
    assert layout.experts_per_rank(8) == 2
    with pytest.raises(ConfigError, match=r"ep=4 must divide the number of experts \(6\).*\[1, 2\]"):
        layout.experts_per_rank(6)


def test_describe_prints_a_row_per_group_and_the_checklist():
    text = ParallelLayout.from_world_size(32, tp=16, ep=2).describe(gpus_per_node=8, num_experts=8)
    assert "32 ranks = tp 16 x cp 1 x dp 2 x pp 1" in text
    assert "tensor parallel (tp)" in text and "expert parallel (all-to-all) (ep)" in text
    assert "pipeline stages" not in text  # size-1 groups are summarised, not tabled
    assert "[!!] tp=16 fits one node of 8 GPUs" in text
    assert "[ok] ep=2 divides 8 experts (4 per rank)" in text
    assert "--sequence-parallel" in text
    many = ParallelLayout.from_world_size(64, tp=2).describe(max_groups=3)
    assert "... (29 more)" in many


def test_megatron_args():
    layout = ParallelLayout.from_world_size(16, tp=2, pp=2, ep=2)
    assert layout.to_megatron_args() == [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--context-parallel-size", "1", "--expert-model-parallel-size", "2", "--sequence-parallel",
    ]
    router = MoERouterConfig(num_experts=8, top_k=2, capacity_factor=1.25, aux_loss_coef=0.01, z_loss_coef=0.001)
    args = layout.to_megatron_args(router)
    flags = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    assert flags["--num-experts"] == "8" and flags["--moe-router-topk"] == "2"
    assert flags["--moe-aux-loss-coeff"] == "0.01" and flags["--moe-z-loss-coeff"] == "0.001"
    assert flags["--moe-expert-capacity-factor"] == "1.25" and flags["--moe-router-dtype"] == "fp32"
    assert flags["--moe-router-load-balancing-type"] == "aux_loss" and flags["--moe-token-dispatcher-type"] == "alltoall"
    dense = ParallelLayout.from_world_size(4, tp=4).to_megatron_args()
    assert "--sequence-parallel" not in dense
    no_aux = ParallelLayout.from_world_size(1).to_megatron_args(MoERouterConfig(num_experts=4, aux_loss_coef=0.0))
    assert no_aux[no_aux.index("--moe-router-load-balancing-type") + 1] == "none"
    assert "--moe-expert-capacity-factor" not in no_aux and "--moe-token-dispatcher-type" not in no_aux
    with pytest.raises(ConfigError, match="ep=2 must divide the number of experts"):
        layout.to_megatron_args(MoERouterConfig(num_experts=5))


def test_deepspeed_config():
    layout = ParallelLayout.from_world_size(16, tp=2, pp=2, ep=2)
    assert layout.to_deepspeed_config(zero_stage=1) == {
        "zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2},
        "pipeline": {"stages": 2}, "moe": {"ep_size": 2},
    }
    router = MoERouterConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    assert ParallelLayout.from_world_size(8, ep=4).to_deepspeed_config(2, router) == {
        "zero_optimization": {"stage": 2},
        "moe": {"ep_size": 4, "num_experts": 8, "k": 2, "capacity_factor": 1.25, "drop_tokens": True},
    }
    assert ParallelLayout.from_world_size(4).to_deepspeed_config(3) == {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match="pipeline engine supports ZeRO stage 0 or 1"):
        layout.to_deepspeed_config(zero_stage=2)
    with pytest.raises(ConfigError, match="AutoTP training supports ZeRO stage 0-2"):
        ParallelLayout.from_world_size(4, tp=2).to_deepspeed_config(zero_stage=3)
    with pytest.raises(ConfigError, match="no context parallelism"):
        ParallelLayout.from_world_size(4, cp=2).to_deepspeed_config()
    with pytest.raises(ConfigError, match="zero_stage=4"):
        ParallelLayout.from_world_size(4).to_deepspeed_config(zero_stage=4)
