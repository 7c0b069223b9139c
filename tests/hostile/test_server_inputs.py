"""Hostile request bodies against the three HTTP apps (`posttrain serve`, the prompt proxy, the
rollout API): every one gets a 4xx in the OpenAI error schema naming the field, never a
plain-text 500, a hang or a silent coercion. Each case is a bug found by probing (issue 21)."""

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.engine import Engine  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from posttrain.server.group_queue import GroupQueue  # noqa: E402
from posttrain.server.prompt_config import load_prompt_config  # noqa: E402
from posttrain.server.proxy import create_proxy_app  # noqa: E402
from posttrain.server.rollout_api import create_rollout_api_app  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]


def _raw(text: str) -> bytes:
    """JSON text as a client may send it: lone surrogates escaped (``\\ud800``) survive."""
    return text.encode("utf-8")


@pytest.fixture(scope="module", params=["posttrain", "hf"])
def serve(request):
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    engine = Engine(model, tok, max_model_len=96, block_size=4, max_num_seqs=8) if request.param == "posttrain" \
        else HFEngine(model, tok)
    app = create_app(engine, tok, "tiny", max_prompt_tokens=64, max_tokens_limit=32, max_n=4)
    # raise_server_exceptions=False: what a real client sees (a traceback would come as plain text)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# -- text that UTF-8 cannot encode (a lone surrogate): was a plain-text 500 --------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi", "name": "\\ud800"}]}', "messages[0].name"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud800"]}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "model": "\\ud800"}', "model"),
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udc80"]}', "prompt[1]"),
    ("/generate", '{"input_ids": [1], "sampling_params": {"stop": "\\ud800"}}', "sampling_params.stop"),
    ("/update_weights_from_disk", '{"model_path": "\\ud800"}', "model_path"),
    ("/load_lora_adapter", '{"lora_name": "a", "lora_path": "\\ud800"}', "lora_path"),
])
def test_unencodable_text_is_a_400_naming_the_field(serve, path, body, param):
    err = _assert_error(serve.post(path, content=_raw(body), headers={"content-type": "application/json"}), 400, param)
    assert "surrogate" in err["message"]


# -- numbers: ranges and types, one layer for every field ------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"seed": 2**70}, "seed"),               # was 500 "Overflow when unpacking long long"
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"n": 2**70}, "n"),
    ({"n": 0}, "n"),
    ({"n": -1}, "n"),
    ({"n": True}, "n"),                      # was accepted as n=1
    ({"n": 2.0}, "n"),                       # was accepted as n=2
    ({"max_tokens": "5"}, "max_tokens"),     # was accepted as 5
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**70}, "top_k"),
    ({"logprobs": "yes"}, "logprobs"),       # was accepted as true
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stream": "true"}, "stream"),
])
def test_chat_numeric_fields_out_of_range_or_mistyped(serve, extra, param):
    _assert_error(serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **extra}), 400, param)


@pytest.mark.parametrize("text, param", [
    ('{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}', "temperature"),  # parses as inf
    ('{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}', "top_p"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "seed": -Infinity}', "seed"),
    ('1e999', None),
])
def test_non_finite_numbers_are_refused(serve, text, param):
    _assert_error(serve.post("/v1/chat/completions", content=_raw(text)), 400, param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "best_of": 2**70}, "best_of"),
    ("/v1/completions", {"prompt": [2**70]}, "prompt[0]"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/generate", {"input_ids": [1], "sampling_params": {"seed": 2**70}}, "sampling_params.seed"),
    ("/generate", {"input_ids": [1], "sampling_params": {"n": 0}}, "sampling_params.n"),  # named 'n' before
    ("/generate", {"input_ids": [1], "sampling_params": {"stop": ["a"] * 5}}, "sampling_params.stop"),
    ("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1.5}}, "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [True]}, "input_ids[0]"),
    ("/generate", {"input_ids": [1], "sampling_params": None}, "sampling_params"),
])
def test_completions_and_generate_numeric_fields(serve, path, body, param):
    _assert_error(serve.post(path, json=body), 400, param)


def test_values_at_the_edge_of_the_ranges_are_served(serve):
    for seed in (2**63 - 1, -(2**63), 0):  # posttrain's engine seeds sample i with seed + i
        resp = serve.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"seed": seed, "n": 4,
                                                                                     "max_new_tokens": 2}})
        assert resp.status_code == 200, resp.text
    resp = serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "temperature": 2, "top_p": 1,
                                                     "top_k": 2**62, "n": 4})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 4


# -- bodies that are not what they should be -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate", "/init_weights_update_group",
                                  "/update_weights_from_distributed", "/update_weights_from_disk"])
@pytest.mark.parametrize("body", ['"a string"', "null", "[]", "42", "true", ""])
def test_bodies_that_are_not_objects(serve, path, body):
    _assert_error(serve.post(path, content=_raw(body)), 400)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ("hi", "messages"), ([1], "messages[0]"), ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"), ([{"role": "user", "content": [{"text": "x"}]}], None),
])
def test_malformed_messages(serve, messages, param):
    _assert_error(serve.post("/v1/chat/completions", json={"messages": messages}), 400, param)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=utf-8", "multipart/form-data"])
def test_any_content_type_is_read_as_json(serve, content_type):
    # curl -d sends application/x-www-form-urlencoded: the body is JSON whatever the header says (documented).
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps({"messages": HI, "max_tokens": 1}).encode()
    assert serve.post("/v1/chat/completions", content=body, headers=headers).status_code == 200
    err = _assert_error(serve.post("/v1/chat/completions", content=b"messages=hi", headers=headers), 400)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize("body, param", [
    ({"master_address": "127.0.0.1", "master_port": 0, "rank_offset": 1, "world_size": 2}, "master_port"),
    ({"master_address": "127.0.0.1", "master_port": 70000, "rank_offset": 1, "world_size": 2}, "master_port"),
    ({"master_address": "127.0.0.1", "master_port": "29500", "rank_offset": 1, "world_size": 2}, "master_port"),
    ({"master_address": "", "master_port": 29500, "rank_offset": 1, "world_size": 2}, "master_address"),
    ({"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 0, "world_size": 2}, "rank_offset"),
    ({"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 1}, "world_size"),
    ({"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2, "backend": "mpi"},
     "backend"),
])
def test_malformed_group_requests(serve, body, param):
    _assert_error(serve.post("/init_weights_update_group", json=body), 400, param)


def test_group_request_with_rank_beyond_world_size_fails_fast(serve):
    resp = serve.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": 29500,
                                                           "rank_offset": 5, "world_size": 2, "backend": "gloo"})
    assert resp.status_code == 400 and resp.json()["success"] is False and "world_size" in resp.json()["message"]


@pytest.mark.parametrize("body, param", [
    ({"names": ["a"], "dtypes": ["float32"], "shapes": [[-1]]}, "shapes[0][0]"),
    ({"names": ["a"], "dtypes": ["float32"], "shapes": [[2**70]]}, "shapes[0][0]"),
    ({"names": "a", "dtypes": ["float32"], "shapes": [[1]]}, "names"),
    ({"names": ["a"], "dtypes": ["float32"], "shapes": [["1"]]}, "shapes[0][0]"),
])
def test_malformed_distributed_updates(serve, body, param):
    _assert_error(serve.post("/update_weights_from_distributed", json=body), 400, param)


def test_the_server_still_serves_after_the_hostile_traffic(serve):
    assert serve.get("/health").status_code == 200
    assert serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200


# -- the prompt proxy and the rollout API share the same door ---------------------------------------------------

@pytest.fixture(scope="module")
def proxy():
    with TestClient(create_proxy_app(None, load_prompt_config("plain"), dry_run=True),
                    raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path, text, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/generate", '{"question": "\\ud800"}', "question"),
    ("/generate", '{"question": "q", "n": 1e999}', "n"),
    ("/generate", '{"question": "q", "seed": 1180591620717411303424}', "seed"),
    ("/generate", '{"question": "q", "n": "2"}', "n"),
    ("/generate", '{"question": "q", "meta": {"deep": "\\udfff"}}', "meta.deep"),
])
def test_proxy_refuses_what_it_could_not_forward(proxy, path, text, param):
    _assert_error(proxy.post(path, content=_raw(text)), 400, param)


@pytest.fixture()
def rollout_api():
    with TestClient(create_rollout_api_app(GroupQueue(max_groups=8, max_staleness=1)),
                    raise_server_exceptions=False) as client:
        assert client.post("/register", json={"name": "e", "group_size": 2}).status_code == 200
        yield client


GROUP = {"env": "e", "policy_version": 0, "prompt_ids": [1], "completion_ids": [[1], [2]], "scores": [1.0, 0.0]}


@pytest.mark.parametrize("change, param", [
    ({"scores": [1.0, "0"]}, "scores[1]"),
    ({"policy_version": 2**64}, "policy_version"),
    ({"policy_version": 1.0}, "policy_version"),
    ({"prompt_ids": [2**63]}, "prompt_ids[0]"),
    ({"metadata": {"note": "\ud800"}}, "metadata.note"),
])
def test_rollout_api_refuses_groups_it_could_not_journal(rollout_api, change, param):
    # json.dumps escapes the lone surrogate as \ud800: the text sent is valid JSON, its value is not.
    _assert_error(rollout_api.post("/groups", content=_raw(json.dumps({**GROUP, **change}))), 400, param)
    assert rollout_api.get("/status").json()["queued"] == 0


def test_rollout_api_refuses_infinite_scores(rollout_api):
    text = json.dumps(GROUP).replace("0.0]", "Infinity]")  # the journal could not write it back as JSON
    _assert_error(rollout_api.post("/groups", content=_raw(text)), 400, "scores[1]")
    assert rollout_api.get("/status").json()["queued"] == 0


def test_a_batch_of_prompts_is_bounded(serve):
    # A 1 MiB body of [[1], [1], ...] asked for 250,000 sequences at once.
    err = _assert_error(serve.post("/v1/completions", json={"prompt": [[5]] * 2049, "max_tokens": 1}), 400, "prompt")
    assert "2048" in err["message"]


def test_deeply_nested_metadata_cannot_poison_the_rollout_queue(rollout_api):
    # 900 levels parsed and were queued; then every GET /batch failed to serialize it (500), forever.
    deep = "[" * 900 + "]" * 900
    text = json.dumps(GROUP)[:-1] + ', "metadata": {"a": ' + deep + "}}"
    err = _assert_error(rollout_api.post("/groups", content=_raw(text)), 400)
    assert err["param"].startswith("metadata.a[0]") and "nested" in err["message"]
    assert rollout_api.post("/groups", json={**GROUP, "metadata": {"a": [[1, 2], {"b": None}]}}).status_code == 200
    assert rollout_api.get("/batch?size=1").json()["groups"][0]["metadata"] == {"a": [[1, 2], {"b": None}]}
