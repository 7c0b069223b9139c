from posttrain.engine.block_manager import BlockManager
from posttrain.engine.scheduler import Scheduler
from posttrain.engine.sequence import Sequence, SequenceSampling


def _seq(tokens, max_tokens=8):
    return Sequence(list(tokens), SequenceSampling(max_tokens=max_tokens))


def test_group_samples_share_full_prompt_blocks_and_refcounts_return_them():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))  # blocks [0..3] [4..7] full, [8, 9] partial
    a, b = _seq(prompt), _seq(prompt)
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table[:2] == b.block_table[:2]  # shared full blocks
    assert a.block_table[2] != b.block_table[2]  # the block with the last token is never shared
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.num_free_blocks == 16 - 4
    bm.deallocate(a)
    assert bm.ref_counts[b.block_table[0]] == 1 and bm.num_free_blocks == 16 - 3
    bm.deallocate(b)
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_reused_and_reset_forgets_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    first = _seq(prompt)
    bm.allocate(first)
    bm.deallocate(first)
    again = _seq(prompt)
    bm.allocate(again)
    assert again.num_cached_tokens == 8  # found in freed-but-cached blocks
    bm.deallocate(again)
    bm.reset_prefix_cache()
    fresh = _seq(prompt)
    bm.allocate(fresh)
    assert fresh.num_cached_tokens == 0


def test_a_prompt_whose_last_token_ends_a_block_recomputes_that_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(range(8)), _seq(range(8))
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_hash_collision_is_not_a_hit(monkeypatch):
    import posttrain.engine.block_manager as module

    monkeypatch.setattr(module, "block_hash", lambda tokens, parent: 42)  # every block collides
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = _seq([1, 2, 3]), _seq([5, 6, 7])
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.block_table[0] != a.block_table[0]


def test_generated_blocks_are_registered_once_written_so_a_next_turn_reuses_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq([1, 2, 3])
    bm.allocate(seq)
    for token in (4, 5, 6, 7, 8):  # decode: each step wrote every current position, then appends
        bm.register_filled_block(seq)
        seq.token_ids.append(token)
        bm.append_slot(seq)
    bm.register_filled_block(seq)
    turn2 = _seq(seq.token_ids + [9, 10])
    bm.allocate(turn2)
    assert turn2.num_cached_tokens == 8
    assert turn2.block_table[:2] == seq.block_table[:2]


def test_scheduler_prefills_then_decodes_and_preempts_the_newest_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq([1, 2, 3, 4]), _seq([5, 6, 7, 8])  # 2 blocks each: the cache is full after both prefill
    sched.add(a)
    sched.add(b)
    seqs, is_prefill = sched.schedule()
    assert is_prefill and seqs == [a, b]
    a.token_ids.append(9)
    b.token_ids.append(9)  # both now need a third block for position 4
    seqs, is_prefill = sched.schedule()
    assert not is_prefill and seqs == [a]  # b was preempted to make room
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b] and not b.block_table
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1


def test_scheduler_respects_the_token_budget_but_runs_a_long_prompt_alone():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    long, short = _seq(range(30)), _seq(range(100, 105))
    sched.add(long)
    sched.add(short)
    seqs, _ = sched.schedule()
    assert seqs == [long]
    seqs, is_prefill = sched.schedule()
    assert is_prefill and seqs == [short]
