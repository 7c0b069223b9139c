import pytest

from posttrain.sync.cadence import SyncCadence


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(cadence, clock, timeline):
    """timeline: (seconds passed, policy version, engine versions or None); returns the decisions,
    recording a sync whenever one is decided."""
    decisions = []
    for dt, version, engines in timeline:
        clock.now += dt
        reason = cadence.decide(version, engines if engines is not None else ())
        if reason:
            cadence.record_sync(version)
        decisions.append(reason)
    return decisions


def test_interval_every_k_versions():
    clock = Clock()
    cadence = SyncCadence(interval=3, clock=clock)
    timeline = [(1, v, None) for v in range(1, 10)]
    assert run(cadence, clock, timeline) == [None, None, "interval"] * 3


def test_interval_counts_optimizer_steps_when_a_step_has_several():
    clock = Clock()
    cadence = SyncCadence(interval=4, clock=clock)
    assert run(cadence, clock, [(1, 2, None), (1, 4, None), (1, 6, None), (1, 8, None)]) == [None, "interval", None, "interval"]


def test_staleness_forces_a_sync_for_a_lagging_engine():
    clock = Clock()
    cadence = SyncCadence(interval=100, max_staleness=2, clock=clock)
    # The engine reports its own version; it lags 1, 2, then 3 > 2 versions.
    assert run(cadence, clock, [(1, 1, [0]), (1, 2, [0]), (1, 3, [0]), (1, 4, [3])]) == [None, None, "staleness", None]


def test_timeout_syncs_only_when_the_policy_changed():
    clock = Clock()
    cadence = SyncCadence(interval=100, timeout_s=10, clock=clock)
    timeline = [(4, 1, None), (4, 2, None), (4, 3, None), (4, 3, None), (20, 3, None), (20, 4, None)]
    assert run(cadence, clock, timeline) == [None, None, "timeout", None, None, "timeout"]


def test_forced_after_resume_and_engine_restart_even_without_changes():
    clock = Clock()
    cadence = SyncCadence(interval=100, clock=clock, synced_version=50)
    cadence.force("resume")
    assert cadence.decide(50) == "forced"
    cadence.record_sync(50)
    assert cadence.decide(50) is None
    cadence.force("engine restart")
    assert run(cadence, clock, [(1, 51, [0]), (1, 52, None)]) == ["forced", None]


def test_nothing_new_means_no_sync_and_bad_settings_fail():
    clock = Clock()
    cadence = SyncCadence(interval=1, max_staleness=1, timeout_s=1, clock=clock)
    assert run(cadence, clock, [(5, 0, [0]), (5, 0, None), (1, 1, None), (1, 1, [1])]) == [None, None, "interval", None]
    with pytest.raises(ValueError):
        SyncCadence(interval=0)
    with pytest.raises(ValueError):
        SyncCadence(max_staleness=-1)
