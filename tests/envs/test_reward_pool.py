from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

import pytest
import torch

from posttrain.envs.reward_pool import RewardPool, ScoredBatch
from posttrain.errors import ConfigError, PosttrainError

SCRIPTED = "envs.faulty_envs.ScriptedEnv"
TIMEOUT_S = 1.5


def batch(*modes: str | float) -> tuple[list, list[dict]]:
    """Samples for ScriptedEnv: a number is an 'ok' sample with that reward, a string a mode."""
    metadata = [{"mode": "ok", "value": m} if isinstance(m, (int, float)) else {"mode": m, "value": 0} for m in modes]
    return [[{"role": "assistant", "content": "x"}] for _ in modes], metadata


def worker_pids(pool: RewardPool) -> set[int]:
    return {w.process.pid for w in pool._workers}


def assert_all_dead(pids: set[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(SCRIPTED, {}, num_workers=2, timeout_s=TIMEOUT_S) as p:
        yield p


def test_rewards_in_input_order(pool):
    scored = pool.score(*batch(*range(10)))
    assert isinstance(scored, ScoredBatch)
    assert scored.rewards.tolist() == [float(i) for i in range(10)]
    assert scored.rewards.dtype == torch.float32 and scored.terminateds.dtype == torch.bool
    assert scored.errors == [None] * 10 and scored.num_timeouts == 0 and scored.num_crashes == 0
    assert scored.answers == [str(i) for i in range(10)]
    assert [m["value"] for m in scored.metadata] == list(range(10))
    assert len({m["worker_pid"] for m in scored.metadata}) == 2  # both workers served jobs


def test_sample_that_hangs_gets_zero_and_batch_completes(pool, caplog):
    before = worker_pids(pool)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="posttrain.envs"):
        scored = pool.score(*batch(1, "sleep", 2, 3))
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 3.0
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0, 3.0]
    assert scored.errors[1] == f"reward timed out after {TIMEOUT_S:g} s"
    assert scored.errors[0] is None and scored.num_timeouts == 1 and scored.num_crashes == 0
    assert scored.terminateds.all()
    assert scored.metadata[1] == {
        "mode": "sleep", "value": 0, "correct": False, "formatted": False, "reward_error": scored.errors[1]
    }
    warnings = [r for r in caplog.records if r.name == "posttrain.envs" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 timed out" in warnings[0].getMessage()

    # The hung worker was killed and replaced; the pool keeps working.
    assert len(pool._workers) == 2 and worker_pids(pool) != before
    assert_all_dead(before - worker_pids(pool))
    assert pool.score(*batch(4, 5, 6)).rewards.tolist() == [4.0, 5.0, 6.0]


def test_worker_crash_gets_zero_and_pool_recovers(pool):
    scored = pool.score(*batch(1, "crash", 2))
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0]
    assert scored.errors[1] == "reward worker crashed (exit code 3)"
    assert scored.num_crashes == 1 and scored.num_timeouts == 0
    assert scored.metadata[1]["reward_error"] == scored.errors[1]
    for _ in range(2):  # later batches still work, on a full set of workers
        assert pool.score(*batch(7, 8, 9)).rewards.tolist() == [7.0, 8.0, 9.0]
    assert len(pool._workers) == 2 and all(w.process.is_alive() for w in pool._workers)


def test_exception_gets_zero_with_message_and_worker_survives(pool):
    pool.score(*batch(0, 0))  # make sure both workers are ready
    before = worker_pids(pool)
    scored = pool.score(*batch(1, "raise", 2))
    assert scored.rewards.tolist() == [1.0, 0.0, 2.0]
    assert scored.errors[1] == "reward raised ValueError: boom 0"
    assert scored.num_crashes == 0 and scored.num_timeouts == 0 and scored.num_errors == 1
    assert worker_pids(pool) == before


def test_timeout_is_per_sample_not_per_batch(pool):
    # 4 samples of 1 s on 2 workers take ~2 s in all, more than timeout_s, but none times out.
    _, metadata = batch(1, 2, 3, 4)
    for m in metadata:
        m.update(mode="slow", seconds=1.0)
    scored = pool.score(*batch(1, 2, 3, 4)[:1], metadata)
    assert scored.num_timeouts == 0 and scored.rewards.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_post_process_runs_in_parent(pool):
    scored = pool.score(*batch(1, 3))
    out, metrics = pool.post_process({"rewards": scored.rewards, "metadata": scored.metadata})
    assert metrics == {"mean_reward": 2.0, "parent_pid": float(os.getpid())}
    assert out["rewards"] is scored.rewards


def test_math_environment_in_workers():
    logs = [[{"role": "assistant", "content": r}] for r in ["\\boxed{4}", "5", "\\boxed{\\frac{1}{2}}", "no", "#### 1,000"]]
    metadata = [{"expected_answer": a} for a in ["4", "4", "0.5", "3", "1000"]]
    with RewardPool("math", {"format_reward": 0.1}, num_workers=1, timeout_s=5.0) as pool:
        scored = pool.score(logs, metadata)
        _, metrics = pool.post_process({"rewards": scored.rewards, "metadata": scored.metadata})
    assert scored.rewards.tolist() == pytest.approx([1.1, 0.0, 1.1, 0.0, 1.0])
    assert scored.answers == ["4", "5", "\\frac{1}{2}", None, "1000"]
    assert metrics == {"accuracy": 0.6, "format_rate": 0.4, "expression_answer_rate": 0.0}


def test_constructor_failure_raises_quickly():
    before = set(mp.active_children())
    start = time.monotonic()
    with pytest.raises(PosttrainError) as e:
        RewardPool("envs.faulty_envs.BrokenInitEnv", {}, num_workers=2, timeout_s=TIMEOUT_S)
    assert time.monotonic() - start < 30
    assert "cannot build this environment" in str(e.value) and "Traceback" in str(e.value)
    assert set(mp.active_children()) <= before  # the failed pool's workers are gone


def test_config_errors_raised_before_spawning():
    with pytest.raises(ConfigError, match="Did you mean 'math'"):
        RewardPool("maths", {}, num_workers=2, timeout_s=1.0)
    with pytest.raises(ConfigError, match="format_rewrd"):
        RewardPool("math", {"format_rewrd": 1.0}, num_workers=2, timeout_s=1.0)


def test_in_process_debug_mode():
    with RewardPool(SCRIPTED, {"bonus": 0.5}, num_workers=0, timeout_s=1.0) as pool:
        assert pool._workers == []
        scored = pool.score(*batch(1, "raise", 2))
        assert scored.rewards.tolist() == [1.5, 0.0, 2.5]
        assert scored.errors == [None, "reward raised ValueError: boom 0", None]
        assert {m.get("worker_pid") for m in (scored.metadata[0], scored.metadata[2])} == {os.getpid()}


def test_worker_left_busy_by_an_interrupted_batch_is_replaced(pool):
    pool.score(*batch(0, 0))  # both workers ready
    stale = pool._workers[0]
    stale.conn.send((-1, [], {"mode": "sleep"}))  # as if Ctrl-C interrupted score() mid-batch
    stale.job, stale.job_started_at = (-1, 0), time.monotonic()
    scored = pool.score(*batch(5, 6))
    assert scored.rewards.tolist() == [5.0, 6.0] and scored.errors == [None, None]
    assert stale not in pool._workers and not stale.process.is_alive()


# Last in the file on purpose: it closes the module's shared pool (saves a 2 s worker start).
def test_close_leaves_no_live_children(pool):
    pool.score(*batch("crash", 1))  # leaves a replacement worker starting up: close() must stop it too
    pids = worker_pids(pool)
    assert len(pids) == 2
    pool.close()
    pool.close()  # idempotent
    assert_all_dead(pids)
    assert not [c for c in mp.active_children() if c.pid in pids]
    with pytest.raises(PosttrainError, match="after close"):
        pool.score(*batch(1))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_20_mb_exception_message_is_cut_before_it_reaches_the_log(num_workers, caplog):
    """A reward environment raising a 20 MB message: the sample's error, its metadata, its
    observation and every log record (the traceback at debug level too) stay a few KB, and say
    how much was cut."""
    size = 20_000_000
    logs, metadata = batch("raise_huge", 1.0)
    metadata[0]["size"] = size
    with caplog.at_level(logging.DEBUG, logger="posttrain"):
        with RewardPool(SCRIPTED, {}, num_workers=num_workers, timeout_s=30.0) as p:
            scored = p.score(logs, metadata)
    assert scored.rewards.tolist() == [0.0, 1.0]
    error = scored.errors[0]
    assert error.startswith("reward raised ValueError: boom xxx") and len(error) < 2100
    assert f"of {len('reward raised ValueError: boom ') + size:,} characters cut" in error
    assert len(scored.metadata[0]["reward_error"]) < 2100 and len(scored.observations[0]["content"]) < 2100
    assert sum(len(r.getMessage()) for r in caplog.records) < 20_000
    assert any("characters cut" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_huge_exception_while_building_the_env_is_cut(capsys):
    with pytest.raises(PosttrainError) as info:
        RewardPool("envs.faulty_envs.HugeInitErrorEnv", {}, num_workers=1, timeout_s=TIMEOUT_S)
    message = str(info.value)
    assert "cannot build this environment yyy" in message and "characters cut" in message
    assert len(message) < 10_000
