"""The prompt proxy: templates from YAML, pass-through to a real backend (our own server with a
tiny model, on 127.0.0.1), /generate with scoring, backend errors, --dry-run."""

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.cli import main  # noqa: E402
from posttrain.envs.math_env import MathEnvironment  # noqa: E402
from posttrain.errors import ConfigError  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from posttrain.server.prompt_config import PromptConfig, load_prompt_config, preset_names  # noqa: E402
from posttrain.server.proxy import create_proxy_app  # noqa: E402
from server.live import closed_port, live_server  # noqa: E402

MODEL = "tiny-llama"
TEMPLATE = PromptConfig(name="t", system_prompt="Be brief.", few_shot=[{"question": "1+1?", "answer": "\\boxed{2}"}],
                        answer_format="Use \\boxed{}.", user_template="Q: {question}\n{answer_format}")


# ---- templates ---------------------------------------------------------------------------------

def test_presets_load_and_template_the_user_turn():
    assert {"math", "gsm8k", "plain"} <= set(preset_names())
    for name in preset_names():
        assert "{question}" in load_prompt_config(name).user_template
    math = load_prompt_config("math")
    assert math.user_turn("What is 2+2?") == "What is 2+2?\n\nPut the final answer in \\boxed{}."
    assert TEMPLATE.chat_messages([{"role": "user", "content": "2+2?"}]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1?\nUse \\boxed{}."}, {"role": "assistant", "content": "\\boxed{2}"},
        {"role": "user", "content": "Q: 2+2?\nUse \\boxed{}."},
    ]
    # The conversation's own system prompt wins; only the last user turn is templated.
    convo = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    out = TEMPLATE.chat_messages(convo)
    assert out[0] == {"role": "system", "content": "Mine."} and out[1]["content"] == "Q: 1+1?\nUse \\boxed{}."
    assert [m["content"] for m in out[3:]] == ["a", "b", "Q: c\nUse \\boxed{}."]
    assert TEMPLATE.text_prompt("2+2?") == "Be brief.\n\nQ: 1+1?\nUse \\boxed{}.\n\\boxed{2}\n\nQ: 2+2?\nUse \\boxed{}."


@pytest.mark.parametrize("text,match", [
    ("system_promt: hi\n", "unknown key"),
    ("user_template: 'no placeholder'\n", "must contain"),
    ("few_shot: [{question: a}]\n", "few_shot"),
    ("- a list\n", "mapping"),
    ("system_prompt: [1]\n", "must be a string"),
])
def test_bad_prompt_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_prompt_config(str(path))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_prompt_config("no-such-preset")


# ---- against a real backend ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backend(tok):
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    app = create_app(HFEngine(model, tok), tok, MODEL, max_prompt_tokens=400, max_tokens_limit=32, max_n=4)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(backend):
    app = create_proxy_app(backend + "/v1", TEMPLATE, env=MathEnvironment())
    with live_server(app) as url:
        yield url


def _prompt_tokens(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False).input_ids)


def test_chat_passes_through_templated(proxy, tok):
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=4,
                                         n=2, seed=1)
    assert len(out.choices) == 2
    # The backend counted the templated conversation's tokens, not the two-character question's.
    assert out.usage.prompt_tokens == _prompt_tokens(tok, TEMPLATE.chat_messages([{"role": "user", "content": "2+2?"}]))
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=4,
                                            seed=1, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=4,
                                           seed=1)
    assert streamed == whole.choices[0].message.content  # same seed, same completion


def test_completions_pass_through_templated(proxy, tok):
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="2+2?", max_tokens=3)
    assert out.usage.prompt_tokens == len(tok(TEMPLATE.text_prompt("2+2?")).input_ids)
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3)  # token ids: untouched
    assert ids.usage.prompt_tokens == 3


def test_generate_scores_a_native_data_point(proxy):
    out = httpx.post(proxy + "/generate", json={"question": "What is 2+2?", "expected_answer": "4", "n": 3,
                                                "max_tokens": 6, "seed": 2}, timeout=30).json()
    assert out["messages"][-1]["content"] == "Q: What is 2+2?\nUse \\boxed{}."
    assert len(out["completions"]) == 3 and len(out["scores"]) == 3
    assert all(0.0 <= s <= 1.1 for s in out["scores"]) and len(out["answers"]) == 3
    missing = httpx.post(proxy + "/generate", json={"question": "What is 2+2?"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "expected_answer"


def test_backend_errors_pass_back_in_the_openai_schema(proxy):
    resp = httpx.post(proxy + "/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10_000})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"  # the backend's own error
    resp = httpx.post(proxy + "/generate", json={"question": "Hi", "expected_answer": "1", "n": 50}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    for body in (b"{not json", b"[1, 2]", b'{"messages": "Hi"}', b'{"prompt": 5}'):
        path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
        resp = httpx.post(proxy + path, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["message"]
    resp = httpx.post(proxy + "/generate", content=b'{"question": "' + b"x" * (2 << 20) + b'"}', timeout=10)
    assert resp.status_code == 413


def test_unreachable_backend_gives_502():
    with closed_port() as port:  # nothing listens there
        _unreachable_backend_gives_502(port)


def _unreachable_backend_gives_502(port):
    app = create_proxy_app(f"http://127.0.0.1:{port}", TEMPLATE, timeout_s=5)
    with TestClient(app) as c:
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
                           ("/generate", {"question": "Hi", "model": "m"})]:
            resp = c.post(path, json=body)
            assert resp.status_code == 502, resp.text
            err = resp.json()["error"]
            assert err["code"] == "backend_unreachable" and "127.0.0.1" in err["message"]


def test_dry_run_prints_the_prompt_and_calls_nothing(capsys):
    with TestClient(create_proxy_app(None, TEMPLATE, dry_run=True)) as c:
        out = c.post("/generate", json={"question": "2+2?", "expected_answer": "4"}).json()
        assert out["dry_run"] and out["messages"][-1]["content"] == "Q: 2+2?\nUse \\boxed{}."
        assert out["metadata"] == {"expected_answer": "4"}
        out = c.post("/v1/completions", json={"prompt": "3+3?"}).json()
        assert out["prompt"] == TEMPLATE.text_prompt("3+3?")
    printed = capsys.readouterr().out
    assert "[system] Be brief." in printed and "Q: 2+2?" in printed and "Q: 3+3?" in printed


def test_serve_proxy_flags():
    assert main(["serve", "--proxy", "http://127.0.0.1:1"]) == 2  # no --prompt-config
    assert main(["serve", "--prompt-config", "math"]) == 2  # no backend, no --dry-run
    assert main(["serve", "--proxy", "http://127.0.0.1:1", "--prompt-config", "nope"]) == 2
