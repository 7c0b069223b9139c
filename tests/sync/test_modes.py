"""Each sync mode moves the trainer's weights into a served engine (in-process app over TestClient)."""

import time

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.config.schema import LoRAConfig  # noqa: E402
from posttrain.models.lora import apply_lora  # noqa: E402
from posttrain.models.weights import weights_checksum  # noqa: E402
from posttrain.rollout.hf_engine import HFEngine  # noqa: E402
from posttrain.sampling import SamplingParams  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from posttrain.sync import SyncCadence, SyncError, WeightSyncDriver  # noqa: E402
from posttrain.sync.broadcast import BroadcastSync  # noqa: E402
from posttrain.sync.checkpoint import CheckpointSync  # noqa: E402
from posttrain.sync.client import EngineClient  # noqa: E402
from posttrain.sync.lora import LoraSync  # noqa: E402
from ports import closed_port  # noqa: E402
from posttrain.sync.shared import SharedSync  # noqa: E402


@pytest.fixture()
def tok():
    return make_tokenizer()


@pytest.fixture()
def served(tok):
    engine = HFEngine(make_tiny_llama(tok, seed=0), tok)
    with TestClient(create_app(engine, tok, "tiny")) as http:
        yield engine, EngineClient("http://testserver", http=http)


def test_shared_moves_nothing_and_the_engine_reads_the_trainer_parameters(tok):
    model = make_tiny_llama(tok)
    engine = HFEngine(model, tok)
    assert SharedSync(engine).push(1, 1) == 0
    trainer_ptrs = [p.data_ptr() for p in model.parameters()]
    assert [p.data_ptr() for p in engine.model.parameters()] == trainer_ptrs
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # an optimizer step is visible to the engine at once
    assert engine.model.model.norm.weight.data_ptr() == model.model.norm.weight.data_ptr()


def test_the_driver_stamps_an_in_process_engine_with_the_version_it_synced(tok):
    """Every weight update the driver makes moves the engine's weight_version (which each sampled
    token records) to the trainer's policy version; skipped updates leave it behind."""
    model = make_tiny_llama(tok)
    engine = HFEngine(model, tok)
    driver = WeightSyncDriver(SharedSync(engine), SyncCadence(interval=2, synced_version=4), engine=engine)
    assert engine.weight_version == driver.engine_version == 4
    assert driver.after_update(5, step=5)["sync/staleness"] == 1.0  # interval 2: not yet
    assert engine.weight_version == 4
    driver.after_update(6, step=6)
    assert engine.weight_version == driver.engine_version == 6
    [[c]] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert c.token_versions == [6, 6, 6]


def test_broadcast_over_gloo_in_buckets(served, tok):
    engine, client = served
    trainer = make_tiny_llama(tok, seed=1)
    sync = BroadcastSync(trainer, client, bucket_mb=16 / 1024, timeout_s=30)  # 16 KB buckets: several calls
    try:
        sync.connect()
        sent = sync.push(version=4, step=2)
        assert sent == sum(p.numel() * 4 for p in trainer.parameters())
        assert weights_checksum(engine.model) == weights_checksum(trainer)
        with torch.no_grad():
            trainer.model.norm.weight.add_(1.0)
        sync.push(version=5, step=3)  # the same group carries every later sync
        assert weights_checksum(engine.model) == weights_checksum(trainer)
        assert client.weight_version()["weight_version"] == "5"
    finally:
        sync.close()


def test_broadcast_peer_that_never_joins_fails_with_a_clear_error(tok):
    with closed_port() as port:  # bound, not listening: the engine can never join
        client = EngineClient(f"http://127.0.0.1:{port}/v1", timeout_s=5)
        sync = BroadcastSync(make_tiny_llama(tok), client, timeout_s=2)
        start = time.monotonic()
        with pytest.raises(SyncError) as err:
            sync.connect(step=7)
        assert time.monotonic() - start < 15
        message = str(err.value)
        assert f"http://127.0.0.1:{port}" in message and "step 7" in message and "did not join" in message
        assert "Cannot reach the engine" in message  # the engine's own failure, not just a timeout
        sync.close()


def test_checkpoint_through_a_folder(served, tok, tmp_path):
    engine, client = served
    trainer = make_tiny_llama(tok, seed=2)
    sync = CheckpointSync(trainer, client, str(tmp_path))
    written = sync.push(version=1, step=1)
    assert written == sum(p.numel() * 4 for p in trainer.parameters())
    assert weights_checksum(engine.model) == weights_checksum(trainer)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_lora_moves_only_the_adapter_and_applies_it_without_restart(served, tok, tmp_path):
    engine, client = served
    trainer = apply_lora(make_tiny_llama(tok, seed=0), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    sync = LoraSync(trainer, client, str(tmp_path))
    for version in (1, 2):
        with torch.no_grad():
            for name, param in trainer.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        moved = sync.push(version=version, step=version)
        adapter_bytes = sum(p.numel() * 4 for p in trainer.parameters() if p.requires_grad)
        assert adapter_bytes <= moved < adapter_bytes + 4096  # the adapter plus the file header
        assert weights_checksum(engine.model) == weights_checksum(trainer)


def test_driver_follows_the_cadence_and_resyncs_before_rollouts_after_an_engine_restart(served, tok, tmp_path):
    engine, client = served
    trainer = make_tiny_llama(tok, seed=3)
    driver = WeightSyncDriver(CheckpointSync(trainer, client, str(tmp_path)), SyncCadence(interval=2), client)
    assert driver.start(0, resumed=False)["sync/bytes"] > 0  # a separate engine gets the weights first
    assert driver.after_update(1, step=1) == {"sync/seconds": 0.0, "sync/bytes": 0.0, "sync/staleness": 1.0}
    metrics = driver.after_update(2, step=2)
    assert metrics["sync/bytes"] > 0 and metrics["sync/seconds"] > 0 and metrics["sync/staleness"] == 0
    assert weights_checksum(engine.model) == weights_checksum(trainer)
    # A restarted server has a new instance id and its initial weights: the next check re-syncs.
    with torch.no_grad():
        engine.model.model.norm.weight.zero_()
    client.http.app.state.weights.instance_id = "restarted"
    driver.before_rollout(2, step=3)
    assert weights_checksum(engine.model) == weights_checksum(trainer)
    assert driver.after_update(2, step=3)["sync/bytes"] == 0  # nothing new since


def test_shared_with_a_server_points_its_parameters_at_the_trainer_memory(tok):
    engine = HFEngine(make_tiny_llama(tok, seed=0), tok)
    app = create_app(engine, tok, "tiny", enable_tensor_updates=True)
    with TestClient(app) as http:
        client = EngineClient("http://testserver", http=http)
        trainer = make_tiny_llama(tok, seed=5)
        sync = SharedSync(engine, trainer, client)
        sync.connect()
        served = dict(engine.model.named_parameters())
        assert all(served[n].data_ptr() == p.data_ptr() for n, p in trainer.named_parameters())
        with torch.no_grad():
            trainer.model.norm.weight.add_(1.0)  # an optimizer step, seen by the server without a copy
        assert sync.push(1, 1) == 0
        assert client.weights_checksum() == weights_checksum(trainer)


def test_write_safetensors_round_trips_through_the_safetensors_reader(tmp_path):
    from safetensors.torch import load_file

    from posttrain.sync.checkpoint import StagingBuffer, write_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3)[:, 1:],  # non-contiguous
        "d": torch.tensor([True, False]),
    }
    staging = StagingBuffer()
    for _ in range(2):  # the staging buffer is reused
        nbytes = write_safetensors(tensors, tmp_path / "w.safetensors", staging)
        loaded = load_file(tmp_path / "w.safetensors")
        assert set(loaded) == set(tensors) and nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_a_resumed_run_syncs_at_the_step_it_resumes_from(served, tok, tmp_path, caplog):
    engine, client = served
    trainer = make_tiny_llama(tok, seed=4)
    driver = WeightSyncDriver(CheckpointSync(trainer, client, str(tmp_path)), SyncCadence(interval=1), client)
    with caplog.at_level("INFO", logger="posttrain.sync"):
        assert driver.start(14, resumed=True, step=7)["sync/bytes"] > 0
    lines = [r.getMessage() for r in caplog.records if "weight sync" in r.getMessage()]
    assert lines and all(line.startswith("step 7: weight sync (checkpoint, ") for line in lines), lines
    assert weights_checksum(engine.model) == weights_checksum(trainer)
