"""AsyncRollouts: admission control over policy versions, errors, timeouts and checkpoint state,
with a fake batch maker (no model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from posttrain.data.sampler import EpochSampler
from posttrain.errors import PosttrainError
from posttrain.sampling import Completion
from posttrain.trainer.async_rollouts import (
    AsyncRollouts, ReadyBatch, load_pending, save_pending, staleness_metrics, token_staleness_metrics,
)
from posttrain.trainer.rollouts import Rollouts


def fake_rollouts(lengths, versions=None) -> Rollouts:
    completions = [Completion([1], [5] * n, "", [0.0] * n, "stop", token_versions=v)
                   for n, v in zip(lengths, versions or [None] * len(lengths))]
    n = len(lengths)
    return Rollouts([None] * n, completions, [[]] * n, torch.zeros(n), torch.zeros(n), [{}] * n, [None] * n, [None] * n)


class Recorder:
    """make_batch that records the published version each batch started under."""

    def __init__(self, sampler: EpochSampler, delay_s: float = 0.0) -> None:
        self.sampler, self.delay_s = sampler, delay_s
        self.started: dict[int, int] = {}
        self.producer: AsyncRollouts | None = None

    def __call__(self, step: int) -> list[Rollouts]:
        self.started[step] = self.producer._published
        self.sampler.next_batch()
        time.sleep(self.delay_s)
        return [fake_rollouts([3, 4])]


def make(max_staleness: int, last_step: int = 6, delay_s: float = 0.0, **kwargs):
    sampler = EpochSampler(100, 2, seed=0)
    recorder = Recorder(sampler, delay_s)
    producer = AsyncRollouts(recorder, sampler, first_step=1, last_step=last_step, published_version=0,
                             max_staleness=max_staleness, timeout_s=kwargs.pop("timeout_s", 5.0), **kwargs)
    recorder.producer = producer
    return producer, recorder


@pytest.mark.parametrize("k", [0, 1, 2])
def test_admission_never_exceeds_k_plus_one_batches_and_bounds_staleness(k):
    producer, recorder = make(k)
    producer.start()
    try:
        time.sleep(0.2)  # the producer runs ahead as far as admission allows, then waits
        assert producer.in_flight() == k + 1
        assert sorted(recorder.started) == list(range(1, k + 2))
        for step in range(1, 7):
            batch = producer.get(step)
            assert batch.step == step
            assert step - 1 - batch.admitted_version <= k  # staleness bound
            time.sleep(0.02)
            producer.publish(step)
        assert producer.in_flight() == 0
    finally:
        producer.close()


def test_max_staleness_zero_is_the_synchronous_schedule():
    producer, recorder = make(0, last_step=4)
    producer.start()
    try:
        for step in range(1, 5):
            assert producer.get(step).admitted_version == step - 1
            time.sleep(0.05)
            assert sorted(recorder.started) == list(range(1, step + 1))  # nothing starts before the update
            producer.publish(step)
    finally:
        producer.close()


def test_a_failing_batch_reaches_the_trainer():
    sampler = EpochSampler(10, 2, seed=0)

    def broken(step):
        raise RuntimeError("replica 1 ran out of memory")

    producer = AsyncRollouts(broken, sampler, first_step=1, last_step=3, published_version=0, max_staleness=1, timeout_s=5)
    producer.start()
    with pytest.raises(RuntimeError, match="replica 1 ran out of memory"):
        producer.get(1)
    producer.close()


def test_waiting_too_long_names_what_was_waited_for():
    producer, _ = make(0, delay_s=2.0, timeout_s=0.3, describe_source=lambda: "2 engine replica(s)")
    producer.start()
    with pytest.raises(PosttrainError, match=r"step 1 waited .* from 2 engine replica\(s\) .*cluster.wait_timeout_s"):
        producer.get(1)
    producer.close()


def test_checkpoint_state_keeps_finished_batches_and_waits_for_the_running_one():
    producer, _ = make(2, delay_s=0.1)
    producer.start()
    try:
        trained = producer.get(1)
        sampler_state, ready = producer.pending_state(trained.sampler_state, wait=True)
        assert [b.step for b in ready] == [2, 3]  # batch 3 was running: the save waited for it
        assert sampler_state == ready[-1].sampler_state == {"epoch": 0, "position": 6, "num_items": 100}
        restored = load_pending(save_pending(ready), start_step=1)
        assert [b.step for b in restored] == [2, 3]
        with pytest.raises(PosttrainError, match="steps \\[2, 3\\], not \\[6, 7\\]"):
            load_pending(save_pending(ready), start_step=5)
    finally:
        producer.close()


def test_restored_batches_are_used_before_generating_new_ones():
    sampler = EpochSampler(100, 2, seed=0)
    made = []

    def make_batch(step):
        made.append(step)
        return [fake_rollouts([2])]

    ready = [ReadyBatch(3, [fake_rollouts([7])], {"epoch": 0, "position": 6, "num_items": 100}, 1, 0.0)]
    producer = AsyncRollouts(make_batch, sampler, first_step=3, last_step=4, published_version=2, max_staleness=1,
                             timeout_s=5, ready=ready).start()
    try:
        assert producer.get(3).rounds[0].completions[0].token_ids == [5] * 7
        assert producer.get(4).step == 4
        assert made == [4]
    finally:
        producer.close()


def test_staleness_metrics_count_token_versions():
    generated = fake_rollouts([2, 2, 3], versions=[[3, 3], [2, 3], [3, 3, 3]])
    trained = fake_rollouts([2, 2], versions=[[3, 3], [2, 3]])
    batch = ReadyBatch(5, [generated], {}, admitted_version=2, generate_s=0.1)
    m = staleness_metrics(batch, trained, generated, policy_version=4)
    assert m["off_policy/staleness_mean"] == pytest.approx((1 + 1 + 2 + 1 + 1 + 1 + 1) / 7)
    assert m["off_policy/staleness_max"] == 2
    assert m["off_policy/staleness_hist/1"] == pytest.approx(2 / 3)
    assert m["off_policy/staleness_hist/2"] == pytest.approx(1 / 3)
    assert m["off_policy/trained_length_mean"] == 2.0
    assert m["off_policy/generated_length_mean"] == pytest.approx(7 / 3)


def test_token_staleness_without_versions_counts_the_default_version():
    """A remote engine reports no per-token versions: its completions count as the version the
    trainer last synced; a synchronous step that synced every time is 0 versions behind."""
    completions = fake_rollouts([2, 3], versions=[None, [6, 6, 8]]).completions
    m = token_staleness_metrics(completions, policy_version=8, default_version=4)
    assert m["off_policy/staleness_mean"] == pytest.approx((4 + 4 + 2 + 2 + 0) / 5)
    assert m["off_policy/staleness_max"] == 4
    assert m["off_policy/staleness_hist/4"] == m["off_policy/staleness_hist/2"] == 0.5
    on_policy = token_staleness_metrics(fake_rollouts([3], versions=[[8, 8, 8]]).completions, 8, 8)
    assert on_policy == {"off_policy/staleness_mean": 0.0, "off_policy/staleness_max": 0.0,
                         "off_policy/staleness_hist/0": 1.0}
