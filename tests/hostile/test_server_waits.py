"""Every wait of `posttrain serve` is bounded and /health tells the truth (issue 21): a request
during a pause gets 503 with Retry-After after --paused-wait-s, one that takes too long gets 504,
joining an unreachable weight-update group neither blocks generation nor outlives its timeout,
a stalled body gets 408, and an unexpected exception is a JSON 500 in all three apps."""

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.engine import Engine  # noqa: E402
from posttrain.sampling import Completion  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server import protocol  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from posttrain.server.group_queue import GroupQueue  # noqa: E402
from posttrain.server.prompt_config import load_prompt_config  # noqa: E402
from posttrain.server.proxy import create_proxy_app  # noqa: E402
from posttrain.server.rollout_api import create_rollout_api_app  # noqa: E402
from server.live import closed_port, live_server  # noqa: E402

GEN = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


def _engine(kind):
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    if kind == "posttrain":
        return Engine(model, tok, max_model_len=64, block_size=4, max_num_seqs=8), tok
    return HFEngine(model, tok), tok


@pytest.mark.parametrize("kind", ["posttrain", "hf"])
def test_requests_during_a_pause_get_503_with_retry_after(kind):
    engine, tok = _engine(kind)
    app = create_app(engine, tok, "tiny", paused_wait_s=0.3)
    with TestClient(app) as http:
        assert http.post("/pause_generation").json()["success"]
        start = time.monotonic()
        resp = http.post("/generate", json=GEN)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "generation_paused"
        assert int(resp.headers["Retry-After"]) >= 1
        assert 0.25 < time.monotonic() - start < 10
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        assert http.post("/v1/chat/completions", json=chat).status_code == 503  # a status, not a stalled stream
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "paused" and health.json()["paused"] is True
        assert http.post("/continue_generation").json()["success"]
        assert http.post("/generate", json=GEN).status_code == 200
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("kind", ["posttrain", "hf"])
def test_a_request_queued_behind_a_short_pause_is_served(kind):
    engine, tok = _engine(kind)
    app = create_app(engine, tok, "tiny", paused_wait_s=20)
    with TestClient(app) as http:
        http.post("/pause_generation")
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", http.post("/generate", json=GEN)))
        worker.start()
        time.sleep(0.3)
        assert "r" not in result  # queued, not refused
        http.post("/continue_generation")
        worker.join(20)
        assert result["r"].status_code == 200, result["r"].text


def test_a_request_over_the_timeout_gets_504_and_the_engine_goes_on():
    engine, tok = _engine("posttrain")
    app = create_app(engine, tok, "tiny", paused_wait_s=60, request_timeout_s=1)
    with TestClient(app) as http:
        http.post("/pause_generation")
        resp = http.post("/generate", json=GEN)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "request_timeout"
        with http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as stream:
            assert stream.status_code == 504
        http.post("/continue_generation")
        assert http.post("/generate", json=GEN).status_code == 200
        assert http.get("/health").json()["requests_in_engine"] == 0


class _SlowEngine:
    """The transformers-engine path with a generation that outlasts the request timeout."""

    def __init__(self):
        self.release = threading.Event()

    def generate(self, prompts, params):
        self.release.wait(20)
        return [[Completion(list(p), [5], "a", [-0.1], "length") for _ in range(params.n)] for p in prompts]

    def update_weights(self, named_tensors=None):
        pass


def test_a_slow_transformers_generation_gets_504():
    engine = _SlowEngine()
    app = create_app(engine, make_tokenizer(), "tiny", request_timeout_s=1)
    with TestClient(app) as http:
        start = time.monotonic()
        assert http.post("/generate", json=GEN).status_code == 504
        assert time.monotonic() - start < 10
        engine.release.set()


def test_joining_an_unreachable_group_does_not_block_generation_and_is_bounded():
    engine, tok = _engine("posttrain")
    app = create_app(engine, tok, "tiny", weight_sync_timeout_s=4)
    with closed_port() as port:  # bound, not listening: nobody can join there
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                "group_name": "g", "backend": "gloo"}
        with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            result = {}

            def join():
                start = time.monotonic()
                result["resp"] = http.post("/init_weights_update_group", json=body)
                result["took"] = time.monotonic() - start

            joiner = threading.Thread(target=join)
            joiner.start()
            deadline = time.monotonic() + 10
            while http.get("/health").json()["weight_groups"] != {"g": "joining"}:
                assert time.monotonic() < deadline and joiner.is_alive(), "the join never showed in /health"
                time.sleep(0.02)
            # Generation goes on while the rendezvous waits (it used to run on the engine's thread).
            for _ in range(3):
                assert http.post("/generate", json=GEN).status_code == 200
            assert joiner.is_alive()  # served while the join still waits
            assert http.get("/health").status_code == 200  # serving: a join under way does not stop it
            joiner.join(30)
            resp = result["resp"]
            assert resp.status_code == 400 and resp.json()["success"] is False
            assert f"127.0.0.1:{port}" in resp.json()["message"] and "--weight-sync-timeout-s" in resp.json()["message"]
            assert result["took"] < 4 + 10
            assert http.get("/health").json()["weight_groups"] == {}


def test_health_reports_a_weight_update_in_progress_and_a_dead_engine_loop():
    engine, tok = _engine("posttrain")
    app = create_app(engine, tok, "tiny")
    receiver = app.state.weights
    entered, release = threading.Event(), threading.Event()

    def slow_load(model_path, load_format=None, weight_version=None):
        entered.set()
        release.wait(20)
        return "loaded"

    receiver.load_from_disk = slow_load
    with TestClient(app) as http:
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault(
            "r", http.post("/update_weights_from_disk", json={"model_path": "/nowhere"})))
        worker.start()
        assert entered.wait(10)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "updating_weights"
        assert health.json()["activity"]["name"] == "update_weights_from_disk"
        release.set()
        worker.join(10)
        assert result["r"].json()["success"] is True
        assert http.get("/health").status_code == 200
        app.state.server.engine_loop.stop()
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stopped"


def test_a_body_that_never_arrives_gets_408(monkeypatch):
    monkeypatch.setattr(protocol, "BODY_TIMEOUT_S", 0.5)
    engine, tok = _engine("hf")
    with live_server(create_app(engine, tok, "tiny")) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # Content-Length says 100 bytes; 5 come. The server used to wait for the rest indefinitely.
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"inp")
            answer = b""
            while b"request_timeout" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer


def _boom():
    raise RuntimeError("unexpected")


@pytest.mark.parametrize("which", ["serve", "proxy", "rollout-api"])
def test_an_unexpected_exception_is_a_json_500_in_every_app(which):
    if which == "serve":
        engine, tok = _engine("hf")
        app = create_app(engine, tok, "tiny")
    elif which == "proxy":
        app = create_proxy_app(None, load_prompt_config("plain"), dry_run=True)
    else:
        app = create_rollout_api_app(GroupQueue(max_groups=4, max_staleness=1))
    app.add_api_route("/boom", _boom, methods=["POST"])
    with TestClient(app) as http:  # raise_server_exceptions: an exception that escapes fails the test
        resp = http.post("/boom")
        assert resp.status_code == 500 and resp.headers["content-type"].startswith("application/json")
        err = resp.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error" and "RuntimeError" in err["message"]
        assert "Traceback" not in resp.text
        assert http.get("/health").status_code == 200


def test_proxy_answers_502_when_the_backend_answers_garbage():
    from fastapi import FastAPI
    from fastapi.responses import Response

    backend = FastAPI()

    @backend.get("/v1/models")
    async def models():
        return Response("not json", media_type="text/plain")

    @backend.post("/v1/chat/completions")
    async def chat():
        return Response("<html>oops</html>", media_type="text/html")

    with live_server(backend, health_path="/v1/models") as url:
        with TestClient(create_proxy_app(url, load_prompt_config("plain"), timeout_s=10)) as http:
            for resp in (http.get("/v1/models"), http.post("/generate", json={"question": "q"}),
                         http.post("/generate", json={"question": "q", "model": "m"})):
                assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error", resp.text
