"""The checkpoint validator: every way a file of a checkpoint can be broken is found, named, and
resume falls back to the newest complete checkpoint; write failures leave earlier ones intact."""

from __future__ import annotations

import errno
import json
import logging

import pytest

import posttrain.checkpoint.manager as manager_module
from helpers import make_tiny_llama, make_tokenizer
from posttrain.checkpoint.manager import CheckpointManager
from posttrain.checkpoint.validate import checkpoint_problems, model_folder_problems, safetensors_problem
from posttrain.errors import PosttrainError


@pytest.fixture
def run(tmp_path):
    """A run folder with complete checkpoints of steps 1 and 2 (weights, tokenizer, optimizer, RNG)."""
    import torch

    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path / "run", keep_last=0)
    for step in (1, 2):
        manager.save(step, model, tokenizer, {"sampler": {"epoch": 0, "position": step}}, optimizer)
    return manager, model, tokenizer


def _truncate(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _break(ckpt, how: str) -> str:
    """Break the checkpoint in one way; return the file name the problem must name."""
    weights = ckpt / "model.safetensors"
    state = ckpt / "trainer_state.json"
    if how == "truncated_weights":
        _truncate(weights, weights.stat().st_size // 2)
        return "model.safetensors: truncated"
    if how == "empty_weights":
        weights.write_bytes(b"")
        return "model.safetensors: empty"
    if how == "garbage_weights":
        weights.write_bytes(b"\x07" * 64)
        return "model.safetensors"
    if how == "no_weights":
        weights.unlink()
        return "no weights"
    if how == "garbage_state":
        state.write_text("{not json")
        return "trainer_state.json: is not valid JSON"
    if how == "empty_state":
        state.write_text("")
        return "trainer_state.json: is empty"
    if how == "list_state":
        state.write_text("[1, 2]")
        return "trainer_state.json: holds a JSON list"
    if how == "string_step":
        state.write_text(json.dumps({"step": "2", "sampler": {}}))
        return "'step' must be an integer"
    if how == "wrong_sampler":
        state.write_text(json.dumps({"step": 2, "sampler": [0]}))
        return "'sampler' must be a JSON object"
    if how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (ckpt / name).unlink()
        return "no tokenizer files"
    if how == "truncated_optimizer":
        _truncate(ckpt / "optimizer.pt", 100)
        return "optimizer.pt: is not a complete torch file"
    if how == "garbage_config":
        (ckpt / "config.json").write_text("")
        return "config.json: is empty"
    raise ValueError(how)


BREAKAGES = ["truncated_weights", "empty_weights", "garbage_weights", "no_weights", "garbage_state", "empty_state",
             "list_state", "string_step", "wrong_sampler", "no_tokenizer", "truncated_optimizer", "garbage_config"]


def test_complete_checkpoints_have_no_problems(run):
    manager, _, _ = run
    assert [checkpoint_problems(c) for c in manager.list()] == [[], []]


@pytest.mark.parametrize("how", BREAKAGES)
def test_broken_latest_checkpoint_falls_back_with_a_warning(run, how, caplog):
    manager, _, _ = run
    latest = manager.latest()
    fragment = _break(latest, how)
    assert any(fragment in p for p in checkpoint_problems(latest)), checkpoint_problems(latest)
    with caplog.at_level(logging.WARNING, logger="posttrain.checkpoint"):
        chosen = CheckpointManager.resolve(manager.output_dir)
    assert chosen.name == "step_000001"
    assert "step_000002" in caplog.text and fragment in caplog.text
    # Named directly, the broken checkpoint is an error that names the file and the good one.
    with pytest.raises(PosttrainError, match="step_000001") as info:
        CheckpointManager.resolve(latest)
    assert fragment in str(info.value)


def test_no_complete_checkpoint_is_an_error_listing_each(run):
    manager, _, _ = run
    first, second = manager.list()
    _break(first, "no_weights")
    _break(second, "garbage_state")
    with pytest.raises(PosttrainError, match="none of its 2 checkpoints is complete") as info:
        CheckpointManager.resolve(manager.output_dir)
    assert "no weights" in str(info.value) and "trainer_state.json" in str(info.value)


def test_step_folder_without_trainer_state_is_not_a_checkpoint(run):
    manager, _, _ = run
    (manager.latest() / "trainer_state.json").unlink()
    assert CheckpointManager.resolve(manager.output_dir).name == "step_000001"


def test_safetensors_header_checks(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    assert safetensors_problem(path) is None
    _truncate(path, path.stat().st_size - 1)
    assert "truncated" in safetensors_problem(path)
    path.write_bytes(b"\xff" * 8 + b"{}")
    assert "does not fit" in safetensors_problem(path)


def test_model_folder_problems(tmp_path):
    assert "empty" in model_folder_problems(tmp_path)[0]
    assert "missing" in model_folder_problems(tmp_path / "nope")[0]


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                          (errno.EFBIG, "file size limit")])
def test_write_failure_names_path_and_free_space_and_keeps_the_previous(run, monkeypatch, code, reason):
    manager, model, tokenizer = run
    before = manager.list()

    def failing_save(obj, path):
        raise OSError(code, "simulated", str(path))

    monkeypatch.setattr(manager_module, "_torch_save", failing_save)
    with pytest.raises(PosttrainError) as info:
        manager.save(3, model, tokenizer, {"sampler": {}})
    message = str(info.value)
    assert "step_000003" in message and reason in message and "free on that file system" in message
    assert "step_000002" in message and "intact" in message
    assert manager.list() == before and not checkpoint_problems(before[-1])
    assert not [p for p in manager.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]


def test_write_failure_of_the_weights_writer(run, monkeypatch):
    """safetensors reports I/O errors as its own exception type, not OSError."""
    manager, model, tokenizer = run
    from safetensors import SafetensorError

    def failing(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(type(model), "save_pretrained", failing)
    with pytest.raises(PosttrainError, match="the disk is full"):
        manager.save(3, model, tokenizer, {"sampler": {}})
