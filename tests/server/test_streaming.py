"""`stream: true` over posttrain's engine: chunks leave as the engine loop produces tokens, and what
they add up to is the non-streamed answer (stop strings cut, usage, logprobs, the openai client)."""

import json
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402

from helpers import make_tokenizer  # noqa: E402
from posttrain.engine import Engine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from server.live import live_server  # noqa: E402
from server.test_engine_loop import _varied_llama  # noqa: E402

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hi there"}]


class StepSpy:
    """Wraps the model runner: counts steps, can hold one step until the test lets it go, and can
    make a step fail."""

    def __init__(self, engine):
        self.run = engine.runner.run
        self.steps = 0
        self.hold_at = None  # step number to hold at
        self.release = threading.Event()
        self.fail_at = None
        engine.runner.run = self

    def __call__(self, seqs, is_prefill):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("injected step failure")
        if self.steps == self.hold_at:
            self.release.wait(20)
        return self.run(seqs, is_prefill)

    def reset(self):
        self.hold_at = self.fail_at = None
        self.release = threading.Event()


@pytest.fixture(scope="module")
def served():
    tok = make_tokenizer()
    engine = Engine(_varied_llama(tok, 0), tok, max_model_len=96, block_size=4, max_num_seqs=16)
    spy = StepSpy(engine)
    with live_server(create_app(engine, tok, MODEL, default_max_tokens=16)) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield engine, spy, url, http


def _events(lines):
    """The JSON events of an SSE body, checking it ends with [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _stream(http, path, body):
    with http.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        return _events(list(resp.iter_lines()))


def _streamed_texts(events, key):
    texts = {}
    for e in events:
        for c in e["choices"]:
            piece = c["delta"].get("content") if key == "chat" else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
    return texts


def test_chat_stream_adds_up_to_the_greedy_answer(served):
    _, spy, _, http = served
    spy.reset()
    body = {"messages": CHAT, "n": 2, "max_tokens": 16, "temperature": 0, "logprobs": True}
    events = _stream(http, "/v1/chat/completions", body)
    whole = http.post("/v1/chat/completions", json=body).json()
    assert all(e["object"] == "chat.completion.chunk" for e in events) and len({e["id"] for e in events}) == 1
    texts = _streamed_texts(events, "chat")
    for i, choice in enumerate(whole["choices"]):
        deltas = [c for e in events for c in e["choices"] if c["index"] == i]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert texts[i] == choice["message"]["content"] and len(texts[i]) > 3
        assert len([d for d in deltas if d["delta"].get("content")]) > 1  # token by token, not in one piece
        assert deltas[-1]["finish_reason"] == choice["finish_reason"]
        streamed = [t for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]]
        assert [t["token"] for t in streamed] == [t["token"] for t in choice["logprobs"]["content"]]
        for a, b in zip(streamed, choice["logprobs"]["content"]):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_completions_stream_two_prompts_n2_with_usage(served):
    _, spy, _, http = served
    spy.reset()
    body = {"prompt": ["Hello", "abc"], "n": 2, "max_tokens": 12, "temperature": 0, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    events = _stream(http, "/v1/completions", body)
    whole = http.post("/v1/completions", json={k: v for k, v in body.items() if k != "stream_options"}).json()
    texts = _streamed_texts(events, "text")
    assert [texts[c["index"]] for c in whole["choices"]] == [c["text"] for c in whole["choices"]]
    assert texts[0] != texts[2]  # the two prompts were told apart
    for c in whole["choices"]:
        pieces = [x for e in events for x in e["choices"] if x["index"] == c["index"]]
        assert [p["finish_reason"] for p in pieces][-1] == c["finish_reason"]
        assert all(p["finish_reason"] is None for p in pieces[:-1])
        offsets = [o for p in pieces for o in p["logprobs"]["text_offset"]]
        assert offsets == c["logprobs"]["text_offset"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_first_chunk_arrives_while_the_request_is_still_generating(served):
    engine, spy, _, http = served
    spy.reset()
    spy.hold_at = spy.steps + 6  # the prefill and four decode steps run, then the loop waits for us
    body = {"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        first_seen_while_held = not spy.release.is_set() and engine.has_unfinished
        spy.release.set()
        events = _events([first, *lines])
    assert first_seen_while_held
    assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
    assert len(events) > 2


def test_stop_strings_never_leak_past_the_cut(served):
    _, spy, _, http = served
    spy.reset()
    body = {"prompt": "Hello", "max_tokens": 24, "temperature": 0}
    free = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(free) >= 12
    stop = free[8:10]
    cut = free[: free.find(stop)]
    events = _stream(http, "/v1/completions", {**body, "stop": [stop, "never-seen"]})
    pieces = [c for e in events for c in e["choices"]]
    assert "".join(p["text"] for p in pieces) == cut
    assert pieces[-1]["finish_reason"] == "stop"
    # Chat too: everything before the stop string, nothing of it or after it.
    chat = {"messages": CHAT, "max_tokens": 24, "temperature": 0}
    free = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert len(free) >= 8
    stop = free[5:7]
    whole = http.post("/v1/chat/completions", json={**chat, "stop": stop}).json()["choices"][0]
    assert whole["message"]["content"] == free[: free.find(stop)]
    events = _stream(http, "/v1/chat/completions", {**chat, "stop": stop})
    assert _streamed_texts(events, "chat")[0] == whole["message"]["content"]
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == whole["finish_reason"]


def test_a_failing_step_mid_stream_sends_an_error_event_then_done(served):
    engine, spy, _, http = served
    spy.reset()
    spy.fail_at = spy.steps + 4
    events = _stream(http, "/v1/completions", {"prompt": "Hello", "max_tokens": 20, "temperature": 0})
    assert events[-1]["error"]["type"] == "server_error"
    assert "injected step failure" in events[-1]["error"]["message"]
    assert any(e.get("choices") for e in events[:-1])  # tokens of the steps before the failure were sent
    assert http.get("/health").json()["requests_in_engine"] == 0


def test_a_client_that_goes_away_aborts_its_sequences(served):
    engine, spy, _, http = served
    spy.reset()
    spy.hold_at = spy.steps + 4
    seqs_before = set(id(s) for s in engine.scheduler.running)
    body = {"prompt": "Hello", "max_tokens": 80, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        next(line for line in resp.iter_lines() if line.startswith("data: "))
        running = [s for s in engine.scheduler.running if id(s) not in seqs_before]
    spy.release.set()  # the connection is closed; the loop goes on and must notice
    deadline = time.monotonic() + 20
    while engine.has_unfinished or http.get("/health").json()["requests_in_engine"]:
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.05)
    assert running and all(s.finish_reason == "abort" and s.num_completion_tokens < 80 for s in running)
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_openai_client_streams(served):
    _, spy, url, _ = served
    spy.reset()
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, n=2)
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == whole.choices[i].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text_chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0, stream=True))
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0)
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
