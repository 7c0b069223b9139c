"""`posttrain serve`'s app on a real socket (127.0.0.1), driven by the official `openai` client, and
hostile traffic: malformed and oversized bodies, absurd parameters, a concurrent flood. Every
hostile request must get a 4xx in the OpenAI error schema, and the server must answer normally after."""

import asyncio
import socket
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from server.live import live_server  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402

MODEL = "tiny-llama"
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def base_url():
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    app = create_app(HFEngine(model, tok), tok, MODEL, max_request_bytes=8192, max_prompt_tokens=256,
                     max_queue=MAX_QUEUE, max_n=4, max_tokens_limit=32, default_max_tokens=8)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nothing")


def test_chat_n_logprobs_and_usage(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], n=3,
                                         max_tokens=6, temperature=0.8, logprobs=True, seed=3)
    assert len(out.choices) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert all(t.logprob <= 0.0 for t in choice.logprobs.content)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert 3 <= out.usage.completion_tokens <= 18


def test_chat_seed_is_reproducible(client):
    def sample(seed):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=8, temperature=1.0, seed=seed)
        return out.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1  # a random 100-token vocabulary: seeds differ


def test_chat_streaming(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}, seed=5)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    same = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          seed=5)
    assert text == same.choices[0].message.content  # streamed and whole answers agree


def test_completions_stop_and_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=["abc", "xyz"], max_tokens=10, n=2, logprobs=0, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens)
    # Greedy continuation, then stop at one of its characters: the text ends before the stop string.
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0).choices[0]
    if len(full.text) >= 3:
        stop = full.text[2]
        cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0, stop=[stop]).choices[0]
        assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_client_sees_errors_as_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10_000)
    assert err.value.status_code == 400 and "max_tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=1000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x" * 300)  # over max_prompt_tokens


# ---- hostile requests over raw HTTP ------------------------------------------------------------

HOSTILE = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"', 400),  # truncated JSON
    ("/v1/chat/completions", b"not json at all", 400),
    ("/v1/chat/completions", b"\x00\xff\xfe\x00", 400),
    ("/v1/chat/completions", b"[" * 100_000, 413),  # deep nesting, also oversized
    ("/v1/chat/completions", b"[" * 4000, 400),  # deep nesting under the size limit
    ("/v1/chat/completions", b'{"messages": "Hi"}', 400),  # wrong type
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e308}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -5}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "n": 0}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "n": 99999999999999999999}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}', 400),
    ("/v1/completions", b'{"prompt": [1, 2, -7]}', 400),  # negative token id
    ("/v1/completions", b'{"prompt": [[1, 2], "mixed"]}', 400),
    ("/v1/completions", b'{"prompt": "hi", "seed": "x"}', 400),
    ("/generate", b'{"input_ids": [1, 2], "sampling_params": {"n": -1}}', 400),
    ("/generate", b'{"input_ids": [1, 2], "sampling_params": {"top_k": -100}}', 400),
    ("/generate", b'{"input_ids": ' + b"[" + b"1," * 3000 + b"1]}", 400),  # huge prompt (under the byte limit)
    ("/generate", b'{"input_ids": "0123"}', 400),
    ("/generate", b"{" + b'"a": 1,' * 2000 + b'"a": 1}', 413),
]


@pytest.mark.parametrize("path,body,status", HOSTILE)
def test_hostile_requests_get_4xx_in_the_error_schema(base_url, path, body, status):
    resp = httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_oversized_by_header_and_by_stream(base_url):
    # A body announced as huge is refused before it is read; a chunked body without a length is cut off.
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n{}")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    def chunks():
        for _ in range(20):
            yield b"x" * 1024

    resp = httpx.post(base_url + "/generate", content=chunks(), timeout=10)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_wrong_methods_and_paths(base_url):
    assert httpx.get(base_url + "/v1/chat/completions", timeout=5).status_code == 405
    assert httpx.post(base_url + "/v1/models", timeout=5).status_code == 405
    resp = httpx.get(base_url + "/../../etc/passwd", timeout=5)
    assert resp.status_code == 404 and "error" in resp.json()


def test_concurrent_flood_gets_429_and_the_server_stays_healthy(base_url, client):
    # 40 simultaneous generations against one running + MAX_QUEUE waiting slots: most must be
    # refused at once with 429 and Retry-After, the admitted ones complete, and then the server
    # answers normally. Bounded: 40 requests, 8 new tokens each, at most a few seconds.
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "n": 4}}

    async def flood():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/generate", json=body) for _ in range(40)))

    start = time.monotonic()
    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 20 and codes.count(200) >= 1
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "queue_full"
    assert time.monotonic() - start < 15
    health = httpx.get(base_url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["requests_in_engine"] == 0
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_many_slow_clients_do_not_block_others(base_url, client):
    # Clients that open a request and send its body slowly hold no engine slot.
    async def slow_bodies():
        async def trickle():
            yield b'{"input_ids": ['
            await asyncio.sleep(1.0)
            yield b"1]}"

        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            slow = [asyncio.create_task(http.post("/generate", content=trickle())) for _ in range(10)]
            await asyncio.sleep(0.2)
            fast = await http.post("/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 2}})
            return fast, await asyncio.gather(*slow)

    fast, slow = asyncio.run(slow_bodies())
    assert fast.status_code == 200
    assert all(r.status_code in (200, 429) for r in slow)
