"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

A block holds the keys and values of ``block_size`` consecutive positions of one sequence. Full
blocks are identified by a chained hash of their tokens and every token before them, so two
sequences that start with the same tokens (the ``n`` samples of a GRPO group, a repeated prompt,
the next turn of a multi-turn episode) point at the same physical blocks, each reference counted.
A freed block keeps its contents and hash until it is handed out again, so a later request with
the same prefix still finds it. The block manager never touches tensors; the model runner does.
"""

from __future__ import annotations

from collections import deque

from posttrain.engine.sequence import Sequence


def block_hash(tokens: list[int], parent: int | None) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Least recently freed first, so cached contents survive as long as possible.
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.num_prefix_hits = 0  # tokens served from the cache, for metrics

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        # Conservative: as if nothing were cached (cached blocks may themselves be free ones).
        return seq.num_blocks(self.block_size) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached full blocks of its prefix.

        The block holding the last token is never taken from the cache: prefill must compute at
        least that position to get the logits of the next token."""
        assert not seq.block_table
        size = self.block_size
        parent: int | None = None
        cache_usable = self.enable_prefix_caching
        last_cacheable = (len(seq) - 1) // size  # blocks before this one lie wholly before the last token
        for i in range(seq.num_blocks(size)):
            tokens = seq.token_ids[i * size : (i + 1) * size]
            full = len(tokens) == size
            h = block_hash(tokens, parent) if full and self.enable_prefix_caching else None
            block = self._lookup(h, tokens) if cache_usable and h is not None and i < last_cacheable else None
            if block is None:
                cache_usable = False  # a miss breaks the chain: later blocks depend on this one
                block = self._take_free_block()
                if h is not None:
                    self._register(block, h, tokens)
            else:
                if self.ref_counts[block] == 0:
                    self.free_blocks.remove(block)
                self.ref_counts[block] += 1
                seq.num_cached_tokens += size
                self.num_prefix_hits += size
            seq.block_table.append(block)
            parent = h

    def deallocate(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token that the next decode step writes (position ``len(seq) - 1``)."""
        needs_block = len(seq.block_table) < seq.num_blocks(self.block_size)
        return self.num_free_blocks >= int(needs_block)

    def append_slot(self, seq: Sequence) -> None:
        """Before a decode step: make sure the block for position ``len(seq) - 1`` exists."""
        if len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take_free_block())

    def register_filled_block(self, seq: Sequence) -> None:
        """After a step wrote the keys and values of every current token of ``seq``: if that
        completed a block, hash it, so a later sequence that continues this one (the next turn of a
        multi-turn episode, a repeated conversation) reuses it."""
        size = self.block_size
        if not self.enable_prefix_caching or len(seq) % size or len(seq) // size > len(seq.block_table):
            return
        i = len(seq) // size - 1
        block = seq.block_table[i]
        if self.block_hashes[block] is not None:
            return
        parent = self.block_hashes[seq.block_table[i - 1]] if i > 0 else None
        if i > 0 and parent is None:
            return  # the chain is broken before this block
        tokens = seq.token_ids[i * size : (i + 1) * size]
        h = block_hash(tokens, parent)
        if h not in self.hash_to_block:
            self._register(block, h, tokens)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: called when the weights change, since cached keys and
        values were computed with the old ones."""
        self.hash_to_block.clear()
        for block in range(self.num_blocks):
            if self.ref_counts[block] == 0:
                self.block_hashes[block] = None
                self.block_tokens[block] = None

    def _lookup(self, h: int, tokens: list[int]) -> int | None:
        block = self.hash_to_block.get(h)
        if block is None or self.block_tokens[block] != tuple(tokens):
            return None  # absent, or a hash collision
        return block

    def _take_free_block(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("no free KV block; the scheduler must preempt before this")
        block = self.free_blocks.popleft()
        old = self.block_hashes[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hashes[block] = None
        self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _register(self, block: int, h: int, tokens: list[int]) -> None:
        self.block_hashes[block] = h
        self.block_tokens[block] = tuple(tokens)
        self.hash_to_block[h] = block
