"""rollout.backend=openai against `posttrain serve`'s app: /generate, and the /v1/completions fallback."""

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.sampling import RolloutEngine, SamplingParams  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.rollout.openai_engine import OpenAIEngine, RemoteEngineError  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from ports import closed_port  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=3)
    model.generation_config.max_length = None
    local = HFEngine(model, tok)
    with TestClient(create_app(HFEngine(model, tok), tok, "tiny")) as http:
        yield tok, local, http


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_native_generate_matches_the_local_engine(setup):
    tok, local, http = setup
    remote = OpenAIEngine("http://testserver/v1", tok, max_concurrency=3, http=http)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6)
    got, want = remote.generate(PROMPTS, params), local.generate(PROMPTS, params)
    assert remote._native is True
    assert isinstance(remote, RolloutEngine)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    for g, w in zip(got, want):
        for c, d in zip(g, w):
            assert c.prompt_token_ids == d.prompt_token_ids and c.finish_reason == d.finish_reason
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs))


def test_completions_fallback_returns_ids_and_logprobs(setup):
    tok, local, http = setup
    remote = OpenAIEngine("http://testserver", tok, max_concurrency=2, http=http)
    remote._native = False  # as against a server without posttrain's /generate
    remote.model_name = "tiny"
    params = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    got, want = remote.generate(PROMPTS, params), local.generate(PROMPTS, params)
    for [c], [d] in zip(got, want):
        assert c.text == tok.decode(d.token_ids, skip_special_tokens=True)
        assert c.finish_reason == d.finish_reason
        assert len(c.logprobs) == len(c.token_ids)
        assert c.token_ids == d.token_ids
        if d.finish_reason == "length":
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs))


def test_completions_choice_that_stopped_at_eos_gets_the_eos_token(setup):
    tok, _, http = setup
    remote = OpenAIEngine("http://testserver", tok, http=http)
    choice = {"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": {"token_logprobs": [-1.0, -2.0]}}
    c = remote._from_choice([5], choice, SamplingParams())
    assert c.token_ids == tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert c.logprobs == [-1.0, -2.0, 0.0] and c.finish_reason == "stop"
    # A stop string ended it: no EOS, and the text keeps the stop string (as /generate does).
    choice = {"index": 0, "text": "ab", "finish_reason": "stop", "stop_reason": "!", "logprobs": {"token_logprobs": [-1.0, -2.0]}}
    c = remote._from_choice([5], choice, SamplingParams(stop=["!"]))
    assert c.text == "ab!" and c.token_ids == tok("ab!", add_special_tokens=False)["input_ids"]


def test_unreachable_server_and_bad_requests_give_clear_errors(setup):
    tok, _, http = setup
    with closed_port() as port:  # nothing listens there
        with pytest.raises(RemoteEngineError, match=f"Cannot reach the rollout server at http://127.0.0.1:{port}.*posttrain serve"):
            OpenAIEngine(f"http://127.0.0.1:{port}/v1", tok, timeout_s=5).generate([[5]], SamplingParams(max_tokens=2))
        remote = OpenAIEngine("http://testserver", tok, http=http)
        with pytest.raises(RemoteEngineError, match="HTTP 400.*vocabulary"):
            remote.generate([[10_000]], SamplingParams(max_tokens=2))
        remote.update_weights(None)
        with pytest.raises(RemoteEngineError, match="sync.mode"):
            remote.update_weights({"x": torch.zeros(1)})
