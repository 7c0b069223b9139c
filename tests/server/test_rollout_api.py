"""The rollout API: queue bound and 429s, staleness drops and counts, leases and acks, the journal
across server restarts, the environment client's retries, and the trainer-side source."""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from posttrain.envs.client import RolloutAPIClient, RolloutAPIError  # noqa: E402
from posttrain.server.group_queue import GroupQueue, PromptFeed, QueueFull  # noqa: E402
from posttrain.server.rollout_api import create_rollout_api_app  # noqa: E402


def group(env="math", version=0, size=2, score=1.0, prompt=(5, 6)):
    return {"env": env, "policy_version": version, "prompt_ids": list(prompt),
            "completion_ids": [[7, 8, 9][: 1 + i % 3] for i in range(size)], "scores": [score] * size}


# ---- the queue as pure logic --------------------------------------------------------------------

def test_bound_staleness_and_counts():
    q = GroupQueue(max_groups=3, max_staleness=1)
    q.register("math", 2)
    q.register("code", 2)
    for env in ("math", "code", "math"):
        assert q.submit(group(env)) == "queued"
    with pytest.raises(QueueFull):
        q.submit(group())
    assert q.set_policy_version(1) == 0  # one version behind: still fresh
    assert q.set_policy_version(2) == 3  # two behind: all dropped
    assert q.submit(group("code", version=0)) == "dropped_stale"  # stale on arrival
    assert q.submit(group("code", version=2)) == "queued"
    status = q.status()
    assert (status["queued"], status["submitted"], status["dropped_stale"]) == (1, 5, 4)
    assert status["envs"]["math"]["dropped_stale"] == 2 and status["envs"]["code"]["dropped_stale"] == 2


def test_take_leases_ack_and_trainer_restart_requeues():
    q = GroupQueue(max_groups=10, max_staleness=-1)  # -1: never stale
    q.register("math", 2)
    for i in range(5):
        q.submit(group(score=float(i)))
    assert q.take(6) is None  # not enough: nothing is handed out
    batch_id, groups = q.take(2)
    assert [g["scores"][0] for g in groups] == [0.0, 1.0]
    lost_id, _ = q.take(2)  # this trainer dies before acking
    assert q.ack(batch_id) == 2 and q.ack(batch_id) == 0
    assert q.trainer_start(version=1) == 2  # the restarted trainer gets the lost batch first
    _, groups = q.take(3)
    assert [g["scores"][0] for g in groups] == [2.0, 3.0, 4.0]
    assert q.status()["consumed"] == 2 and q.ack(lost_id) == 0


def test_a_fast_environment_cannot_crowd_out_a_late_one():
    q = GroupQueue(max_groups=4, max_staleness=-1)
    q.register("fast", 2)
    for _ in range(4):
        q.submit(group("fast"))  # alone, it may fill the whole queue
    q.register("late", 2)
    assert q.share() == 2
    with pytest.raises(QueueFull):
        q.submit(group("fast"))  # over its share now
    q.submit(group("late"))
    q.submit(group("late"))
    with pytest.raises(QueueFull):
        q.submit(group("late"))
    _, taken = q.take(5)  # the environments take turns
    assert [g["env"] for g in taken] == ["fast", "late", "fast", "late", "fast"]
    q.submit(group("fast"))  # back under its share


def test_environments_take_turns_in_a_batch():
    q = GroupQueue(max_groups=10, max_staleness=-1)
    q.register("fast", 2)
    q.register("slow", 2)
    for i in range(4):
        q.submit(group("fast", score=float(i)))
    q.submit(group("slow", score=10.0))
    _, groups = q.take(3)
    assert [(g["env"], g["scores"][0]) for g in groups] == [("fast", 0.0), ("slow", 10.0), ("fast", 1.0)]
    assert [g["scores"][0] for g in q.queued] == [2.0, 3.0]


def test_journal_survives_a_server_restart(tmp_path):
    path = tmp_path / "journal.jsonl"
    q = GroupQueue(max_groups=10, max_staleness=1, journal=path)
    q.register("math", 2)
    for i in range(4):
        q.submit(group(score=float(i)))
    batch_id, _ = q.take(1)
    q.ack(batch_id)  # group 0 consumed
    q.take(1)  # group 1 leased, never acked: must come back
    q.set_policy_version(1)
    q.close()
    with open(path, "a") as f:
        f.write('{"op": "group", "gro')  # a crash in the middle of a write

    q2 = GroupQueue(max_groups=10, max_staleness=1, journal=path)
    assert [g["scores"][0] for g in q2.queued] == [1.0, 2.0, 3.0]
    status = q2.status()
    assert (status["policy_version"], status["submitted"], status["consumed"]) == (1, 4, 1)
    assert q2.envs["math"]["group_size"] == 2
    assert q2.submit(group(score=9.0)) == "queued"
    assert q2.queued[-1]["id"] == 4  # ids continue, never reused
    q2.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["op"] == "snapshot" and len(lines) == 1 + 3 + 1  # compacted, then appended
    q3 = GroupQueue(max_groups=10, max_staleness=1, journal=path)
    assert [g["scores"][0] for g in q3.queued] == [1.0, 2.0, 3.0, 9.0]
    assert (q3.status()["submitted"], q3.status()["consumed"]) == (5, 1)  # compacted groups are not counted twice
    q3.close()


def test_the_journal_is_compacted_while_running(tmp_path, monkeypatch):
    import posttrain.server.group_queue as group_queue

    monkeypatch.setattr(group_queue, "COMPACT_EVERY", 5)
    path = tmp_path / "journal.jsonl"
    q = GroupQueue(max_groups=100, max_staleness=-1, journal=path)
    q.register("math", 2)
    for i in range(40):
        q.submit(group(score=float(i)))
        batch_id, _ = q.take(1)
        if i < 39:
            q.ack(batch_id)  # the last one stays leased
    assert len(path.read_text().splitlines()) < 20  # not 1 + 40 groups + 39 acks
    q.close()
    q2 = GroupQueue(max_groups=100, max_staleness=-1, journal=path)
    assert [g["scores"][0] for g in q2.queued] == [39.0]  # the leased group survived compaction
    assert (q2.status()["submitted"], q2.status()["consumed"]) == (40, 39)
    q2.close()


# ---- HTTP -----------------------------------------------------------------------------------------

@pytest.fixture
def api():
    q = GroupQueue(max_groups=4, max_staleness=0)
    with TestClient(create_rollout_api_app(q, max_request_bytes=8192)) as c:
        yield c


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_http_round_trip(api):
    assert api.post("/register", json={"name": "math", "group_size": 2}).json()["policy_version"] == 0
    for _ in range(3):
        assert api.post("/groups", json=group()).json()["status"] == "queued"
    out = api.get("/batch", params={"size": 2}).json()
    assert out["batch_id"] and len(out["groups"]) == 2 and out["queued"] == 1
    assert api.get("/batch", params={"size": 2, "wait_s": 0.1}).json()["batch_id"] is None
    assert api.post("/ack", json={"batch_id": out["batch_id"]}).json() == {"acked": 2}
    assert api.post("/policy_version", json={"version": 1}).json()["dropped_stale"] == 1
    status = api.get("/status").json()
    assert status["envs"]["math"] == {"group_size": 2, "submitted": 3, "consumed": 2, "dropped_stale": 1, "queued": 0}


def test_full_queue_gets_429_with_retry_after(api):
    api.post("/register", json={"name": "math", "group_size": 2})
    for _ in range(4):
        api.post("/groups", json=group())
    resp = api.post("/groups", json=group())
    assert _error(resp, 429)["code"] == "queue_full" and resp.headers["retry-after"]


@pytest.mark.parametrize("body,param", [
    ({**group(), "env": "nobody"}, "env"),
    ({**group(), "completion_ids": [[1]]}, "completion_ids"),  # wrong group size
    ({**group(), "scores": [1.0]}, "scores"),
    ({**group(), "logprobs": [[-0.1], [-0.1]]}, "logprobs[1]"),  # one per token
    ({**group(), "logprobs": [[0.5], [-0.1, -0.2]]}, "logprobs"),
    ({**group(), "masks": [[2], [1, 1]]}, "masks[0][0]"),
    ({**group(), "completion_ids": [[], [1]]}, "completion_ids[0]"),
    ({**group(), "prompt_ids": [-1]}, "prompt_ids"),
    ({**group(), "scores": [float("nan"), 1.0]}, None),
    ({**group(), "policy_version": -1}, "policy_version"),
    ({**group(), "extra": 1}, "extra"),
    ({**group(), "finish_reasons": ["done", "stop"]}, "finish_reasons[0]"),
])
def test_bad_groups_get_4xx(api, body, param):
    api.post("/register", json={"name": "math", "group_size": 2})
    resp = api.post("/groups", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    err = _error(resp, 409 if param == "env" else 400)
    if param is not None:
        assert err["param"] == param
    assert api.get("/status").json()["queued"] == 0


def test_hostile_requests(api):
    _error(api.post("/groups", content=b'{"env": "m', headers={"content-type": "application/json"}), 400)
    _error(api.post("/groups", content=b"x" * 10_000), 413)
    _error(api.post("/register", json={"name": "bad name/../", "group_size": 2}), 400)
    _error(api.post("/register", json={"name": "m", "group_size": 0}), 400)
    _error(api.get("/batch", params={"size": 0}), 400)
    _error(api.get("/batch", params={"size": 5}), 400)  # more than the queue can ever hold
    _error(api.get("/batch", params={"size": "many"}), 400)
    _error(api.get("/batch", params={"size": 1, "wait_s": 1e9}), 400)
    _error(api.post("/policy_version", json={"version": "latest"}), 400)
    _error(api.get("/nothing"), 404)
    assert api.get("/health").json()["status"] == "ok"


# ---- the client over a real socket -----------------------------------------------------------

def test_client_retries_on_429_until_the_trainer_takes_groups():
    from server.live import live_server

    q = GroupQueue(max_groups=2, max_staleness=-1)
    with live_server(create_rollout_api_app(q)) as url:
        env = RolloutAPIClient(url, backoff_s=0.05, max_backoff_s=0.1, max_retries=100)
        trainer = RolloutAPIClient(url)
        env.register("math", 2)
        g = group()
        for _ in range(2):
            assert env.submit_group(g["prompt_ids"], g["completion_ids"], g["scores"], policy_version=0) == "queued"

        def consume_later():
            time.sleep(0.3)
            batch_id, groups = trainer.get_batch(2, wait_s=1)
            trainer.ack(batch_id)

        consumer = threading.Thread(target=consume_later)
        consumer.start()
        start = time.monotonic()
        assert env.submit_group(g["prompt_ids"], g["completion_ids"], g["scores"], policy_version=0) == "queued"
        consumer.join(timeout=30)
        assert not consumer.is_alive(), "the consumer thread did not finish within 30 s"
        assert env.num_retries >= 1 and time.monotonic() - start >= 0.25
        impatient = RolloutAPIClient(url, backoff_s=0.01, max_retries=1)
        impatient.register("math", 2)
        impatient.submit_group(g["prompt_ids"], g["completion_ids"], g["scores"], policy_version=0)
        with pytest.raises(RolloutAPIError, match="queue is full"):
            impatient.submit_group(g["prompt_ids"], g["completion_ids"], g["scores"], policy_version=0)
        with pytest.raises(RolloutAPIError, match="HTTP 400"):
            env.submit_group([1], [[1]], [1.0], policy_version=0)  # wrong group size: not retried
    unreachable = RolloutAPIClient(url, backoff_s=0.01, max_retries=1)
    with pytest.raises(RolloutAPIError, match="unreachable"):
        unreachable.register("math", 2)


def test_concurrent_submission_flood_is_bounded():
    import asyncio

    from server.live import live_server

    q = GroupQueue(max_groups=4, max_staleness=-1)
    with live_server(create_rollout_api_app(q)) as url:
        httpx.post(url + "/register", json={"name": "math", "group_size": 2})

        async def flood():
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                return await asyncio.gather(*(http.post("/groups", json=group()) for _ in range(60)))

        start = time.monotonic()
        codes = [r.status_code for r in asyncio.run(flood())]
        assert codes.count(200) == 4 and codes.count(429) == 56
        assert time.monotonic() - start < 10
        status = httpx.get(url + "/status").json()
        assert status["queued"] == 4 and status["submitted"] == 4
        assert len(httpx.get(url + "/batch", params={"size": 4}).json()["groups"]) == 4


def test_prompt_feed_serves_every_row_once_per_epoch(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "expected_answer": str(i)}) + "\n" for i in range(5)) + "\n")
    feed = PromptFeed(path, seed=1)
    with TestClient(create_rollout_api_app(GroupQueue(max_groups=2, max_staleness=0), prompts=feed)) as c:
        got = c.get("/prompts", params={"n": 7}).json()["prompts"]
        assert sorted(p["index"] for p in got[:5]) == [0, 1, 2, 3, 4] and [p["epoch"] for p in got] == [0] * 5 + [1] * 2
        assert got[0]["row"] == {"prompt": f"q{got[0]['index']}", "expected_answer": str(got[0]["index"])}
        _error(c.get("/prompts", params={"n": 0}), 400)
    assert [p["index"] for p in PromptFeed(path, seed=1).next(5)] == [p["index"] for p in got[:5]]  # seeded
    with TestClient(create_rollout_api_app(GroupQueue(max_groups=2, max_staleness=0))) as c:
        assert _error(c.get("/prompts"), 404)["code"] == "no_prompts"
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        PromptFeed(path)


def test_killed_server_restarts_from_its_journal(tmp_path):
    """`posttrain rollout-api --journal`, killed with SIGKILL, then started again on the same file."""
    import sys

    from ports import start_server_process

    def args(port):
        return [sys.executable, "-m", "posttrain", "rollout-api", "--port", str(port), "--journal", str(tmp_path / "j.jsonl")]

    log = tmp_path / "rollout-api.log"
    url, proc = start_server_process(args, log, timeout_s=60)
    port = int(url.rsplit(":", 1)[1])

    def start():  # again on the same address: the clients keep their URL
        return start_server_process(args, log, port=port, timeout_s=60)[1]

    try:
        env = RolloutAPIClient(url)
        env.register("math", 2)
        for score in (1.0, 2.0, 3.0):
            g = group(score=score)
            env.submit_group(g["prompt_ids"], g["completion_ids"], g["scores"], policy_version=0)
        trainer = RolloutAPIClient(url)
        batch_id, _ = trainer.get_batch(1)
        trainer.ack(batch_id)
        trainer.get_batch(1)  # leased when the server dies
        proc.kill()
        proc.wait(10)
        proc = start()
        status = env.status()
        assert (status["queued"], status["submitted"], status["consumed"]) == (2, 3, 1)
        _, groups = trainer.get_batch(2)
        assert [g["scores"][0] for g in groups] == [2.0, 3.0]
    finally:
        proc.kill()
        proc.wait(10)
