"""Multi-process training: process group set-up, FSDP2 sharding, the split of work across ranks,
and the re-launch under torchrun. See docs/distributed.md."""

from posttrain.distributed.balance import RankShardedSampler, rank_share, same_count_across_ranks
from posttrain.distributed.fsdp import (
    clip_grad_norm,
    full_tensor,
    gathered_for_generation,
    is_sharded,
    iter_full_weights,
    shard_model,
)
from posttrain.distributed.layout import ParallelLayout
from posttrain.distributed.process_group import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_process_group,
    get_rank,
    get_world_size,
    init_process_group,
    is_distributed,
    is_main_process,
    mean_across_ranks,
)

__all__ = [
    "ParallelLayout", "RankShardedSampler", "rank_share", "same_count_across_ranks", "clip_grad_norm", "full_tensor",
    "gathered_for_generation", "is_sharded", "iter_full_weights", "shard_model", "all_gather_objects", "all_reduce_max",
    "all_reduce_sum", "barrier", "broadcast_object", "destroy_process_group", "get_rank", "get_world_size",
    "init_process_group", "is_distributed", "is_main_process", "mean_across_ranks",
]
