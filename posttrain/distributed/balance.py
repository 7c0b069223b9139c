"""Work split across ranks: the prompt groups of a step, and micro-batch counts that match.

Under FSDP every forward and backward is a sequence of collectives (an all-gather per layer, a
reduce-scatter per layer), so every rank must run the same number of them: a rank that finished
its micro-batches early would wait forever for the others. Token-budget micro-batching can give
ranks different counts; :func:`same_count_across_ranks` splits the largest local micro-batches
until every rank has the global maximum."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from posttrain.distributed.process_group import all_reduce_max, get_rank, get_world_size, is_distributed
from posttrain.errors import PosttrainError

T = TypeVar("T")


def same_count_across_ranks(micro_batches: list[list[T]], size: Callable[[T], int]) -> list[list[T]]:
    """``micro_batches`` re-split so that every rank has as many as the rank with the most: the
    micro-batch with the largest total ``size`` is halved (by size) until the count matches. Halving
    keeps each within any token budget it met. A no-op on one rank. A collective: call on all ranks."""
    if not is_distributed():
        return micro_batches
    target = int(all_reduce_max(float(len(micro_batches))))
    batches = [list(b) for b in micro_batches]
    while len(batches) < target:
        splittable = [b for b in batches if len(b) > 1]
        if not splittable:
            raise PosttrainError(
                f"rank {get_rank()} has {sum(len(b) for b in batches)} samples but another rank needs {target} "
                "micro-batches: ranks must hold equally many samples per mini-batch."
            )
        largest = max(splittable, key=lambda b: sum(size(x) for x in b))
        batches.remove(largest)
        halves: tuple[list[T], list[T]] = ([], [])
        for item in sorted(largest, key=size, reverse=True):  # greedy: next item to the lighter half
            min(halves, key=lambda h: sum(size(x) for x in h)).append(item)
        batches += list(halves)
    return batches


def rank_share(items: list[Any], block: int | None = None) -> list[Any]:
    """This rank's share of ``items``: of every consecutive ``block`` items (default: all of them) its
    contiguous ``1/world_size``. Ranks in order, block by block, give back ``items``."""
    world = get_world_size()
    block = block or len(items)
    if len(items) % block or block % world:
        raise PosttrainError(f"{len(items)} items in blocks of {block} cannot be split evenly over {world} ranks.")
    share, rank = block // world, get_rank()
    return [x for start in range(0, len(items), block) for x in items[start + rank * share:start + (rank + 1) * share]]


class RankShardedSampler:
    """Wraps an epoch sampler that draws a step's prompts: every rank draws the same global batch
    (same seed, same state) and keeps its share, so each prompt's whole group is generated, scored
    and trained on one rank, and the ranks together see exactly the prompts one process would.

    ``prompts_per_mini_batch``: the share is taken per mini-batch (rank r holds the r-th 1/N of
    every mini-batch's prompts), so that the ranks' local mini-batch j together are exactly the
    mini-batch j one process would train on, and give its gradient. State (checkpoints) is the
    wrapped sampler's, identical on every rank."""

    def __init__(self, sampler: Any, prompts_per_mini_batch: int | None = None) -> None:
        self.sampler = sampler
        self.prompts_per_mini_batch = prompts_per_mini_batch

    def next_batch(self) -> list[int]:
        return rank_share(self.sampler.next_batch(), self.prompts_per_mini_batch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
