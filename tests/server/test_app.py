import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.sampling import Completion, SamplingParams  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def client(tok):
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    app = create_app(HFEngine(model, tok), tok, MODEL, max_request_bytes=4096, max_prompt_tokens=64, max_queue=4,
                     max_n=4, max_tokens_limit=32)
    with TestClient(app) as c:
        yield c


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def _sse_events(resp):
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["object"] == "model"
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    _assert_error(client.get("/v1/models/other"), 404)
    _assert_error(client.get("/nope"), 404)


def test_chat_completion_schema_and_usage(client, tok):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 3, "max_tokens": 5,
            "temperature": 0.7, "seed": 1}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == MODEL
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for choice in out["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["logprobs"] is None
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(tok(prompt, add_special_tokens=False).input_ids)
    assert 3 <= usage["completion_tokens"] <= 15
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same seed gives the same samples
    again = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in out["choices"]]


def test_chat_logprobs_and_max_completion_tokens(client):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
            "max_completion_tokens": 4, "temperature": 0, "logprobs": True}
    out = client.post("/v1/chat/completions", json=body).json()
    [choice] = out["choices"]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    assert all(entry["logprob"] <= 0 and entry["top_logprobs"] == [] for entry in content)
    if choice["finish_reason"] == "length":
        assert out["usage"]["completion_tokens"] == 4
        assert "".join(entry["token"] for entry in content) == choice["message"]["content"]


def test_chat_stream_format(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        resp.read()
    events = _sse_events(resp)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    full = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    for i in range(2):
        deltas = [c for e in events for c in e["choices"] if c["index"] == i]
        assert deltas[0]["delta"]["role"] == "assistant"
        assert "".join(d["delta"].get("content", "") for d in deltas) == full["choices"][i]["message"]["content"]
        assert deltas[-1]["finish_reason"] == full["choices"][i]["finish_reason"]


def test_completions_list_of_prompts_and_logprobs(client):
    body = {"model": MODEL, "prompt": ["What is 2+3?", "Hi"], "n": 2, "max_tokens": 3, "temperature": 0,
            "logprobs": 0}
    out = client.post("/v1/completions", json=body).json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy
    for choice in out["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) <= 3
        assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] == len("What is 2+3?") + len("Hi")  # one token per character
    # a single string prompt, and token ids, give the same greedy text
    single = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}).json()
    ids = client.post("/v1/completions", json={"prompt": [[t for t in _ids("Hi")]], "max_tokens": 3,
                                                "temperature": 0}).json()
    assert single["choices"][0]["text"] == ids["choices"][0]["text"] == out["choices"][2]["text"]
    assert single["choices"][0]["logprobs"] is None


def _ids(text):
    return make_tokenizer()(text, add_special_tokens=False).input_ids


def test_completions_stream_and_stop(client):
    free = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                                         "stream": True}) as resp:
        resp.read()
    events = _sse_events(resp)
    assert [e["object"] for e in events] == ["text_completion"]
    assert events[0]["choices"][0]["text"] == text
    if len(text) >= 4:
        stop = text[2:4]
        cut = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                                   "stop": stop}).json()["choices"][0]
        assert cut["finish_reason"] == "stop"
        assert cut["text"] == text[: text.find(stop)]  # the stop string itself is left out


def test_generate_token_ids_round_trip(client, tok):
    prompt = _ids("What is 2+3?")
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    out = client.post("/generate", json=body).json()
    assert set(out) >= {"output_ids", "text", "logprobs", "finish_reason"}
    assert 1 <= len(out["output_ids"]) <= 6
    assert len(out["logprobs"]) == len(out["output_ids"])
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    # the text of /v1/completions on the same prompt is the same greedy continuation
    same = client.post("/v1/completions", json={"prompt": "What is 2+3?", "max_tokens": 6, "temperature": 0}).json()
    assert same["choices"][0]["text"] == out["text"]
    many = client.post("/generate", json={"input_ids": prompt, "sampling_params": {"n": 2, "max_tokens": 3,
                                                                                  "logprobs": False}}).json()
    assert isinstance(many, list) and len(many) == 2
    assert all(m["logprobs"] is None and len(m["output_ids"]) <= 3 for m in many)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 5}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 33}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "bogus": 1}, "bogus"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b", "c", "d", "e"]},
     "stop"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x" * 65}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 999999]]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/generate", {"input_ids": []}, "input_ids"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -0.5}}, "sampling_params.temperature"),
    ("/generate", {"input_ids": ["a"]}, "input_ids[0]"),
    ("/generate", [1, 2, 3], None),
])
def test_bad_requests_get_400_in_the_error_schema(client, path, body, param):
    err = _assert_error(client.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_malformed_json_and_oversized_bodies(client, path):
    _assert_error(client.post(path, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    _assert_error(client.post(path, content=b"\xff\xfe not utf-8"), 400)
    _assert_error(client.post(path, content=b"[" * 3000 + b"]" * 0), 400)
    err = _assert_error(client.post(path, json={"prompt": "x" * 5000}), 413)
    assert err["code"] == "request_too_large"


class _BlockingEngine:
    """Holds every call until released, to fill the queue."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def generate(self, prompts, params: SamplingParams):
        self.started.set()
        assert self.release.wait(10)
        return [[Completion(list(p), [5], "a", [-0.1], "length") for _ in range(params.n)] for p in prompts]

    def update_weights(self, named_tensors=None):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


def test_full_queue_gets_429_and_engine_errors_get_500(tok):
    engine = _BlockingEngine()
    app = create_app(engine, tok, MODEL, max_queue=0)
    with TestClient(app) as c:
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", c.post("/generate", json=body)))
        worker.start()
        assert engine.started.wait(10)
        err = _assert_error(c.post("/generate", json=body), 429)
        assert err["code"] == "queue_full"
        engine.release.set()
        worker.join(10)
        assert result["r"].status_code == 200 and result["r"].json()["output_ids"] == [5]
        assert c.post("/generate", json=body).status_code == 200  # the slot is free again

    class Broken(_BlockingEngine):
        def generate(self, prompts, params):
            raise RuntimeError("boom")

    with TestClient(create_app(Broken(), tok, MODEL)) as c:
        err = _assert_error(c.post("/generate", json={"input_ids": [5]}), 500)
        assert err["type"] == "server_error" and "boom" in err["message"]


def test_serve_subcommand_is_registered():
    from posttrain.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "some/path", "--port", "8123", "--max-queue", "3"])
    assert (args.command, args.model, args.port, args.max_queue, args.host) == ("serve", "some/path", 8123, 3, "127.0.0.1")
