"""CheckpointManager: layout, HF round trip, optimizer/RNG restore, pruning, resolve, crash safety."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_llama, make_tokenizer
from posttrain.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from posttrain.errors import PosttrainError


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    return make_tiny_llama(tokenizer, seed=0), tokenizer


def make_optimizer_and_scheduler(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return optimizer, scheduler


def test_save_layout_and_hf_round_trip(tmp_path, tiny):
    model, tokenizer = tiny
    manager = CheckpointManager(tmp_path, keep_last=0)
    path = manager.save(10, model, tokenizer, {"epoch": 1, "samples": [1, 2]})
    assert path == tmp_path / "checkpoints" / "step_000010"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "rng_state.pt"} <= names
    assert "optimizer.pt" not in names and "scheduler.pt" not in names
    assert json.loads((path / "trainer_state.json").read_text()) == {
        "epoch": 1, "samples": [1, 2], "step": 10, "state_files": []}  # state_files: saved without optimizer
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000010"]

    loaded = AutoModelForCausalLM.from_pretrained(path)
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    loaded_tokenizer = AutoTokenizer.from_pretrained(path)
    assert loaded_tokenizer("ab+1")["input_ids"] == tokenizer("ab+1")["input_ids"]
    assert loaded_tokenizer.eos_token == tokenizer.eos_token


def test_optimizer_scheduler_and_rng_round_trip(tmp_path):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer, seed=1)
    optimizer, scheduler = make_optimizer_and_scheduler(model)
    manager = CheckpointManager(tmp_path, keep_last=2)

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = manager.save(3, model, tokenizer, {"x": 1}, optimizer=optimizer, scheduler=scheduler)
    expected = (torch.rand(4), random.random(), np.random.rand(3))
    saved_opt = optimizer.state_dict()

    fresh_model = AutoModelForCausalLM.from_pretrained(path)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0 / (step + 1))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = CheckpointManager.load_trainer_state(path, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state == {"x": 1, "step": 3}
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])

    loaded_opt = fresh_opt.state_dict()
    for key, values in saved_opt["state"].items():
        assert loaded_opt["state"][key]["step"] == values["step"]
        assert torch.equal(loaded_opt["state"][key]["exp_avg"], values["exp_avg"])
        assert torch.equal(loaded_opt["state"][key]["exp_avg_sq"], values["exp_avg_sq"])
    assert fresh_sched.last_epoch == scheduler.last_epoch == 1
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_rng_capture_restore_directly():
    state = capture_rng_state()
    values = (torch.rand(2), random.random(), np.random.rand())
    restore_rng_state(state)
    assert torch.equal(torch.rand(2), values[0])
    assert random.random() == values[1] and np.random.rand() == values[2]


def test_missing_optimizer_state_explains_save_optimizer(tmp_path, tiny):
    model, tokenizer = tiny
    path = CheckpointManager(tmp_path, keep_last=0).save(1, model, tokenizer, {})
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(PosttrainError, match="checkpoint.save_optimizer=false"):
        CheckpointManager.load_trainer_state(path, optimizer=optimizer)
    assert CheckpointManager.load_trainer_state(path) == {"step": 1}


def test_a_deleted_optimizer_file_falls_back_to_the_previous_complete_checkpoint(tmp_path, tiny, caplog):
    """optimizer.pt deleted from the latest checkpoint (saved with it): resuming the run folder
    skips that checkpoint, naming the file, for the previous one; resuming the checkpoint itself
    says the file is missing, not that it was saved with checkpoint.save_optimizer=false."""
    model, tokenizer = tiny
    optimizer, scheduler = make_optimizer_and_scheduler(model)
    manager = CheckpointManager(tmp_path, keep_last=0)
    first = manager.save(1, model, tokenizer, {}, optimizer, scheduler)
    latest = manager.save(2, model, tokenizer, {}, optimizer, scheduler)
    (latest / "optimizer.pt").unlink()
    with caplog.at_level("WARNING"):
        assert CheckpointManager.resolve(tmp_path) == first
    assert f"Skipping checkpoint {latest}" in caplog.text and "optimizer.pt: missing" in caplog.text
    with pytest.raises(PosttrainError, match="optimizer.pt: missing.*newest complete checkpoint of this run is"):
        CheckpointManager.resolve(latest)
    with pytest.raises(PosttrainError, match="was saved with optimizer.pt, which is missing now") as info:
        CheckpointManager.load_trainer_state(latest, optimizer=optimizer)
    assert "save_optimizer" not in str(info.value)
    assert CheckpointManager.load_trainer_state(first, optimizer=optimizer, scheduler=scheduler) == {"step": 1}


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path, tiny):
    model, tokenizer = tiny
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 10):
        manager.save(step, model, tokenizer, {"tag": step})
    assert [p.name for p in manager.list()] == ["step_000003", "step_000010"]
    assert manager.latest() == tmp_path / "checkpoints" / "step_000010"
    # Saving an older step never deletes the checkpoint just written.
    manager.save(5, model, tokenizer, {"tag": 5})
    assert [p.name for p in manager.list()] == ["step_000005", "step_000010"]
    # Re-saving an existing step replaces it in place.
    manager.save(10, model, tokenizer, {"tag": "again"})
    assert json.loads((manager.latest() / "trainer_state.json").read_text())["tag"] == "again"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005", "step_000010"]


def test_leftovers_are_cleaned_at_construction(tmp_path, tiny):
    model, tokenizer = tiny
    good = CheckpointManager(tmp_path, keep_last=0).save(4, model, tokenizer, {})
    checkpoints = tmp_path / "checkpoints"
    stale = checkpoints / ".tmp-step_000008-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    # A crash between the two renames of a re-save leaves the good checkpoint aside.
    os.replace(good, checkpoints / ".old-step_000004-12345")
    manager = CheckpointManager(tmp_path, keep_last=0)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004"]
    assert manager.latest() == good


def test_resolve_run_dir_checkpoint_dir_and_bad_paths(tmp_path, tiny):
    model, tokenizer = tiny
    manager = CheckpointManager(tmp_path / "run", keep_last=0)
    manager.save(2, model, tokenizer, {})
    newest = manager.save(7, model, tokenizer, {})
    assert CheckpointManager.resolve(tmp_path / "run") == newest
    assert CheckpointManager.resolve(str(tmp_path / "run" / "checkpoints")) == newest
    first = tmp_path / "run" / "checkpoints" / "step_000002"
    assert CheckpointManager.resolve(first) == first
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty", first / "config.json"):
        with pytest.raises(PosttrainError, match="Expected a checkpoint folder") as info:
            CheckpointManager.resolve(bad)
        assert str(bad) in str(info.value)
    assert CheckpointManager(tmp_path / "empty", keep_last=1).latest() is None


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, tiny, monkeypatch, error):
    model, tokenizer = tiny
    manager = CheckpointManager(tmp_path, keep_last=1)
    good = manager.save(5, model, tokenizer, {"tag": "good"})

    def crash(self, save_directory, *args, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    for step in (6, 5):  # a new step, and a re-save of the existing one
        with pytest.raises(type(error)):
            manager.save(step, model, tokenizer, {"tag": "bad"})
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]
    assert manager.list() == [good]
    assert json.loads((good / "trainer_state.json").read_text())["tag"] == "good"
    assert AutoModelForCausalLM.from_pretrained(good) is not None


def test_negative_keep_last_is_rejected(tmp_path):
    with pytest.raises(PosttrainError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_ctrl_c_during_commit_is_delivered_after_the_renames(tmp_path, tiny, monkeypatch):
    import signal

    model, tokenizer = tiny
    manager = CheckpointManager(tmp_path, keep_last=0)
    manager.save(5, model, tokenizer, {"tag": "old"})
    real_replace = os.replace

    def replace_with_ctrl_c(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # arrives between "old aside" and "new in place"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        manager.save(5, model, tokenizer, {"tag": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]
    assert json.loads((manager.latest() / "trainer_state.json").read_text())["tag"] == "new"
