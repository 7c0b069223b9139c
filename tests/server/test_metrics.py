"""`GET /metrics` of `posttrain serve`: Prometheus text that a scraper parses, with request counts
by endpoint and status, latency, generated tokens, queue depth, sequences, pause and weight version."""

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.engine import Engine  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402


def _scrape(http):
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("kind", ["posttrain", "hf"])
def test_metrics_count_requests_tokens_and_state(kind, tmp_path):
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    model.generation_config.max_length = None
    engine = Engine(model, tok, max_model_len=64, block_size=4, max_num_seqs=8) if kind == "posttrain" \
        else HFEngine(model, tok)
    with TestClient(create_app(engine, tok, "tiny", max_tokens_limit=16)) as http:
        before = _scrape(http)
        assert _value(before, "posttrain_generated_tokens_total") == 0
        assert _value(before, "posttrain_paused") == 0 and _value(before, "posttrain_weight_version") == -1
        outs = [http.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3, "n": 2}})
                for _ in range(2)]
        assert all(o.status_code == 200 for o in outs)
        assert http.post("/generate", json={"input_ids": []}).status_code == 400
        http.get("/no/such/path")
        save_file({n: p.detach() for n, p in model.named_parameters()}, str(tmp_path / "model.safetensors"))
        assert http.post("/update_weights_from_disk", json={"model_path": str(tmp_path), "weight_version": "12"}).json()[
            "success"]
        http.post("/pause_generation")
        queued = threading.Thread(target=http.post, args=("/generate",), kwargs={"json": {"input_ids": [5]}})
        queued.start()
        deadline = time.monotonic() + 10
        while _value(after := _scrape(http), "posttrain_queue_depth") != 1:  # waiting behind the pause
            assert time.monotonic() < deadline
            time.sleep(0.02)
        http.post("/continue_generation")
        queued.join(20)

    generated = sum(len(c["output_ids"]) for o in outs for c in o.json())
    assert _value(after, "posttrain_generated_tokens_total") == generated > 0
    assert _value(after, "posttrain_requests_total", endpoint="/generate", status="200") == 2
    assert _value(after, "posttrain_requests_total", endpoint="/generate", status="400") == 1
    assert _value(after, "posttrain_requests_total", endpoint="other", status="404") == 1
    assert _value(after, "posttrain_request_duration_seconds_count", endpoint="/generate") == 3
    assert _value(after, "posttrain_request_duration_seconds_bucket", endpoint="/generate", le="+Inf") == 3
    assert _value(after, "posttrain_weight_version") == 12 and _value(after, "posttrain_paused") == 1
    assert _value(after, "posttrain_requests_in_flight") == 1
    for gauge in ("posttrain_running_sequences", "posttrain_waiting_sequences"):
        assert (gauge, ()) in after and after[(gauge, ())] == 0
