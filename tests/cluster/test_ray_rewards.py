"""The reward pool as Ray actors: the local pool's rewards, timeouts and crash containment."""

from __future__ import annotations

import os
import time

import pytest

from posttrain.cluster import RayRewardPool, build_reward_pool
from posttrain.config.cluster_schema import ClusterConfig
from posttrain.config.schema import EnvConfig
from posttrain.envs.reward_pool import RewardPool
from posttrain.errors import PosttrainError

ray = pytest.importorskip("ray")

SCRIPTED = "envs.faulty_envs.ScriptedEnv"  # tests/ is on the trainer's sys.path, which the actors get
TIMEOUT_S = 1.5
RAY = ClusterConfig(backend="ray", wait_timeout_s=60)


def batch(*modes: str | float) -> tuple[list, list[dict]]:
    """Samples for ScriptedEnv: a number is an 'ok' sample with that reward, a string a mode."""
    metadata = [{"mode": "ok", "value": m} if isinstance(m, (int, float)) else {"mode": m, "value": 0} for m in modes]
    return [[{"role": "assistant", "content": "x"}] for _ in modes], metadata


def actor_pids(pool: RayRewardPool) -> set[int]:
    return {w.pid for w in pool._workers if w.pid is not None}


def wait_dead(pids: set[int], timeout_s: float = 10.0) -> None:
    """ray.kill returns before the process is gone: wait (bounded) until each pid has exited."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"actor process {pid} still runs"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def pool(ray_local):
    p = build_reward_pool(EnvConfig(cls=SCRIPTED, num_workers=2, timeout_s=TIMEOUT_S), RAY)
    assert isinstance(p, RayRewardPool) and not p.owns_ray  # the test's Ray: the pool must not shut it down
    with p:
        yield p


def test_rewards_in_input_order_from_two_actors(pool):
    scored = pool.score(*batch(*range(8)))
    assert scored.rewards.tolist() == [float(i) for i in range(8)]
    assert scored.errors == [None] * 8 and scored.num_timeouts == 0 and scored.num_crashes == 0
    assert scored.answers == [str(i) for i in range(8)]
    pids = {m["worker_pid"] for m in scored.metadata}
    assert pids == actor_pids(pool) and len(pids) == 2 and os.getpid() not in pids


def test_rewards_equal_the_local_pool(ray_local):
    """Two tasks (math-verify and a toy), routed by metadata["task"]: everything equal but the pids."""
    env = EnvConfig(num_workers=1, timeout_s=30, tasks={"math": {"cls": "math"}, "digits": {"cls": "toy_envs.DigitFractionEnv"}})
    answers = ["so \\boxed{1/2}", "\\boxed{0.5}", "it is 3", "#### 1,000", "\\boxed{x^2}", "no idea", "12ab", "7"]
    gold = ["0.5", "1/2", "3", "1000", "x**2", "4", None, None]
    logs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": a}] for a in answers]
    metadata = [{"task": "math", "expected_answer": g} if g is not None else {"task": "digits"} for g in gold]
    with build_reward_pool(env, ClusterConfig(backend="local")) as local_pool:
        assert type(local_pool) is RewardPool
        local = local_pool.score(logs, metadata)
        local_metrics = local_pool.post_process({"rewards": local.rewards, "metadata": local.metadata})[1]
    with build_reward_pool(env, RAY) as ray_pool:
        assert isinstance(ray_pool, RayRewardPool)
        remote = ray_pool.score(logs, metadata)
        remote_metrics = ray_pool.post_process({"rewards": remote.rewards, "metadata": remote.metadata})[1]
    assert remote.rewards.tolist() == local.rewards.tolist() and remote_metrics == local_metrics
    assert [m.get("correct") for m in remote.metadata[:2]] == [True, True]  # math-verify really ran
    assert remote.metadata == local.metadata and remote.answers == local.answers
    assert remote.observations == local.observations and remote.errors == local.errors == [None] * 8
    assert remote.terminateds.tolist() == local.terminateds.tolist()


def test_a_sample_that_hangs_times_out_and_the_batch_completes(pool):
    before = actor_pids(pool)
    start = time.monotonic()
    scored = pool.score(*batch(1, "sleep", 2, 3))
    assert time.monotonic() - start < TIMEOUT_S + 5.0
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0, 3.0]
    assert scored.num_timeouts == 1 and scored.num_crashes == 0 and scored.errors[0] is None
    error = scored.errors[1]
    # the local pool's text, then which actor it was: the one that is gone now
    assert error.startswith(f"reward timed out after {TIMEOUT_S:g} s (reward worker ")
    killed = before - actor_pids(pool)
    assert len(killed) == 1 and f"pid {min(killed)}), killed and replaced" in error
    assert scored.metadata[1]["reward_error"] == error and scored.terminateds.all()
    wait_dead(killed)  # ray.kill'ed
    assert len(pool._workers) == 2
    assert pool.score(*batch(4, 5, 6)).rewards.tolist() == [4.0, 5.0, 6.0]


def test_an_actor_that_dies_costs_one_sample_and_the_pool_keeps_working(pool):
    scored = pool.score(*batch(1, "crash", 2))  # the environment calls os._exit(3)
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0]
    assert scored.num_crashes == 1 and scored.num_timeouts == 0
    error = scored.errors[1]
    assert error.startswith("reward worker crashed (reward worker ") and "worker process has died" in error  # Ray's cause
    deadline = time.monotonic() + 30
    while True:  # later batches work at once, and the replacement actor joins in when it has started
        again = pool.score(*batch(*range(6)))
        assert again.rewards.tolist() == [float(i) for i in range(6)] and again.num_errors == 0
        if len({m["worker_pid"] for m in again.metadata}) == 2:
            break
        assert time.monotonic() < deadline, "the replacement actor never scored a sample"
        time.sleep(0.2)
    assert len(pool._workers) == 2 and len(actor_pids(pool)) == 2


def test_an_exception_in_the_environment_is_that_samples_error(pool):
    scored = pool.score(*batch(1, "raise", 2))
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0]
    assert scored.errors[1] == "reward raised ValueError: boom 0"  # as the local pool says it
    assert scored.num_crashes == scored.num_timeouts == 0


def test_actors_that_cannot_start_give_a_timeout_error_naming_them(ray_local):
    # more CPUs than the test's Ray has: the actors wait to be placed, stuck
    stuck = ClusterConfig(backend="ray", wait_timeout_s=2, cpus_per_reward_worker=64)
    with pytest.raises(PosttrainError) as caught:
        build_reward_pool(EnvConfig(cls=SCRIPTED, num_workers=2), stuck)
    message = str(caught.value)
    assert "reward worker 0 (Ray actor " in message and "reward worker 1 (Ray actor " in message
    assert "did not start within 2 s" in message and "cluster.cpus_per_reward_worker=64" in message


def test_an_environment_that_fails_to_build_stops_with_its_traceback(ray_local):
    with pytest.raises(PosttrainError, match=r"(?s)failed in reward worker 0 .*cannot build this environment"):
        build_reward_pool(EnvConfig(cls="envs.faulty_envs.BrokenInitEnv", num_workers=1), RAY)


def test_replacements_that_keep_failing_to_start_stop_the_pool(ray_local, tmp_path):
    flag = tmp_path / "broken"
    env = EnvConfig(cls="envs.faulty_envs.BrokenOnceFlaggedEnv", kwargs={"flag": str(flag)}, num_workers=1)
    with build_reward_pool(env, RAY) as pool:
        flag.touch()  # from now on the environment cannot be built
        with pytest.raises(PosttrainError, match=r"(?s)failed to start 3 times in a row; last error: a replacement "
                                                 r"reward worker 0 .*cannot build this environment any more"):
            pool.score(*batch(1, "crash", 2))
