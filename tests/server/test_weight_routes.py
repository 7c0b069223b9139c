"""The SGLang-compatible weight-update endpoints, driven through posttrain.sync.client."""

import base64
import io
from multiprocessing.reduction import ForkingPickler

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.models.weights import weights_checksum  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from posttrain.sync.base import SyncError  # noqa: E402
from posttrain.sync.client import EngineClient  # noqa: E402


@pytest.fixture()
def served():
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=0)
    model.generation_config.max_length = None
    app = create_app(HFEngine(model, tok), tok, "tiny", enable_tensor_updates=True)
    with TestClient(app) as http:
        yield model, EngineClient("http://testserver", http=http), http


def test_update_from_disk_loads_weights_and_version(served, tmp_path):
    model, client, http = served
    trained = make_tiny_llama(make_tokenizer(), seed=1)
    save_file({n: p.detach() for n, p in trained.named_parameters()}, str(tmp_path / "model.safetensors"))
    info = client.weight_version()
    assert info["weight_version"] == "initial"
    out = client.update_weights_from_disk(str(tmp_path), weight_version="7")
    assert out["success"] is True and "loaded" in out["message"]
    assert weights_checksum(model) == weights_checksum(trained) == client.weights_checksum()
    assert client.weight_version() == {"weight_version": "7", "instance_id": info["instance_id"]}
    # The engine stamps the tokens it samples with the numeric label; /generate reports them.
    out = http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}}).json()
    assert out["meta_info"] == {"weight_version": "7", "token_versions": [7] * len(out["output_ids"])}


def test_a_label_that_is_not_a_number_counts_labelled_updates(served, tmp_path):
    from posttrain.rollout.openai_engine import OpenAIEngine
    from posttrain.sampling import SamplingParams

    model, client, http = served
    save_file({n: p.detach() for n, p in model.named_parameters()}, str(tmp_path / "model.safetensors"))
    client.update_weights_from_disk(str(tmp_path))  # no label: versions unchanged
    client.update_weights_from_disk(str(tmp_path), weight_version="step-a")
    client.update_weights_from_disk(str(tmp_path), weight_version="step-b")
    # posttrain's remote engine reads the per-token versions into its completions.
    engine = OpenAIEngine("http://testserver", make_tokenizer(), http=http)
    [[c]] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
    engine.pool.shutdown(wait=True)  # not close(): the fixture closes its client
    assert engine._native and c.token_versions == [2] * len(c.token_ids) and c.token_ids


def test_failed_updates_answer_success_false_with_400(served, tmp_path):
    model, client, http = served
    before = weights_checksum(model)
    resp = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
    assert resp.status_code == 400 and resp.json()["success"] is False and "No .safetensors" in resp.json()["message"]
    save_file({"model.layers.0.nope": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SyncError, match="not in the model"):
        client.update_weights_from_disk(str(tmp_path))
    resp = http.post("/update_weights_from_distributed", json={"names": ["a"], "dtypes": ["bfloat16"], "shapes": [[2]],
                                                               "group_name": "none"})
    assert resp.status_code == 400 and "init_weights_update_group" in resp.json()["message"]
    resp = http.post("/update_weights_from_disk", json={"load_format": "auto"})  # model_path missing
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model_path"
    assert weights_checksum(model) == before


def test_update_from_tensor_in_sglang_format(served):
    model, client, http = served
    new = torch.full_like(model.model.norm.weight, 0.5)
    buf = io.BytesIO()
    ForkingPickler(buf).dump([("model.norm.weight", new)])
    payload = base64.b64encode(buf.getvalue()).decode()
    assert client.update_weights_from_tensor([payload], weight_version="3")["success"]
    torch.testing.assert_close(model.model.norm.weight, new)


def test_tensor_updates_are_refused_unless_enabled():
    tok = make_tokenizer()
    app = create_app(HFEngine(make_tiny_llama(tok), tok), tok, "tiny")
    with TestClient(app) as http:
        resp = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["eA=="]})
        assert resp.status_code == 400 and "--enable-tensor-updates" in resp.json()["message"]


def test_flush_pause_and_continue(served):
    model, client, http = served
    client.flush_cache()
    assert http.get("/flush_cache").status_code == 200
    client.pause_generation()
    # Updates still run while paused (they need the engine that the pause holds).
    buf = io.BytesIO()
    ForkingPickler(buf).dump([("model.norm.weight", torch.ones_like(model.model.norm.weight))])
    assert client.update_weights_from_tensor([base64.b64encode(buf.getvalue()).decode()])["success"]
    server = http.app.state.server
    assert server.engine_lock.locked()
    client.continue_generation()
    assert not server.engine_lock.locked()
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    assert http.post("/generate", json=body).status_code == 200
