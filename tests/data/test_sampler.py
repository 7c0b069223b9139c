"""EpochSampler: seeded epochs, epoch crossing, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posttrain.data import EpochSampler
from posttrain.errors import PosttrainError


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_epochs_are_seeded_permutations():
    s = EpochSampler(10, 5, seed=3)
    flat = sum(take(s, 4), [])
    assert flat[:10] == np.random.default_rng([3, 0]).permutation(10).tolist()
    assert flat[10:] == np.random.default_rng([3, 1]).permutation(10).tolist()
    assert s.epoch == 2
    assert take(EpochSampler(10, 5, seed=3), 4) == take(EpochSampler(10, 5, seed=3), 4)
    assert take(EpochSampler(10, 5, seed=4), 2) != take(EpochSampler(10, 5, seed=3), 2)


def test_batches_cross_epoch_boundaries():
    s = EpochSampler(7, 3, seed=0)
    batches = take(s, 7)  # 21 indices = exactly 3 epochs
    assert all(len(b) == 3 for b in batches)
    flat = sum(batches, [])
    for e in range(3):
        assert sorted(flat[7 * e : 7 * e + 7]) == list(range(7))
    assert s.epoch == 3 and s.state_dict()["position"] == 0


def test_batch_larger_than_dataset():
    s = EpochSampler(3, 8, seed=1)
    b = s.next_batch()
    assert len(b) == 8 and s.epoch == 2 and s.state_dict()["position"] == 2
    assert sorted(b[:3]) == sorted(b[3:6]) == [0, 1, 2]


def test_no_shuffle():
    s = EpochSampler(4, 3, seed=9, shuffle=False)
    assert take(s, 3) == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]


@pytest.mark.parametrize("num_items,batch_size,stop_after", [(10, 3, 5), (7, 7, 2), (3, 8, 3), (100, 16, 13)])
def test_resume_matches_uninterrupted(num_items, batch_size, stop_after):
    reference = EpochSampler(num_items, batch_size, seed=42)
    expected = take(reference, stop_after + 10)

    first = EpochSampler(num_items, batch_size, seed=42)
    assert take(first, stop_after) == expected[:stop_after]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    assert {"epoch", "position"} <= set(state)

    resumed = EpochSampler(num_items, batch_size, seed=42)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    assert take(resumed, 10) == expected[stop_after:]


def test_load_state_validation():
    s = EpochSampler(5, 2, seed=0)
    with pytest.raises(PosttrainError, match="saved for 6 prompts"):
        s.load_state_dict({"epoch": 0, "position": 0, "num_items": 6})
    with pytest.raises(PosttrainError, match="invalid sampler state"):
        s.load_state_dict({"epoch": 0, "position": 5})


def test_constructor_validation_and_negative_seed():
    with pytest.raises(PosttrainError, match="empty dataset"):
        EpochSampler(0, 2, seed=0)
    with pytest.raises(PosttrainError, match="batch_size"):
        EpochSampler(3, 0, seed=0)
    assert len(EpochSampler(3, 2, seed=-1).next_batch()) == 2


@pytest.mark.parametrize("num_items,batch_size", [(7, 3), (8, 32), (10, 5), (5, 1)])
def test_epoch_bounded_batches_never_repeat_an_item_and_end_with_their_epoch(num_items, batch_size):
    s = EpochSampler(num_items, batch_size, seed=2, epoch_bounded=True)
    steps = s.steps_for_epochs(2)
    assert steps == 2 * -(-num_items // batch_size)
    batches = take(s, steps)
    assert all(len(set(b)) == len(b) <= batch_size for b in batches)
    flat = sum(batches, [])
    assert sorted(flat[:num_items]) == sorted(flat[num_items:]) == list(range(num_items))  # two whole epochs
    assert s.epoch == 2 and s.position == 0
    assert EpochSampler(num_items, batch_size, 2, epoch_bounded=True).epochs_for_steps(steps) == 2.0


def test_small_data_is_one_batch_per_epoch_unless_batches_cross_epochs():
    bounded = EpochSampler(8, 32, seed=0, epoch_bounded=True)
    assert bounded.steps_for_epochs(1) == 1 and sorted(bounded.next_batch()) == list(range(8))
    crossing = EpochSampler(8, 32, seed=0)
    assert crossing.steps_for_epochs(1) == 1 and len(crossing.next_batch()) == 32  # 4 epochs in one batch
    assert crossing.epochs_for_steps(1) == 4.0


def test_epoch_bounded_resume_continues_exactly():
    reference = take(EpochSampler(10, 4, seed=5, epoch_bounded=True), 6)
    first = EpochSampler(10, 4, seed=5, epoch_bounded=True)
    take(first, 2)
    resumed = EpochSampler(10, 4, seed=5, epoch_bounded=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert take(resumed, 4) == reference[2:]
    assert [len(b) for b in reference] == [4, 4, 2, 4, 4, 2]
