"""Acceptance: GRPO with the engine in a separate `posttrain serve` process; weights move by
broadcast (gloo) or checkpoint, or are shared (CPU shared memory), and afterwards the server's
weights equal the trainer's."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import save_tiny_model
from ports import server_process
from posttrain.cli import main
from posttrain.models.weights import weights_checksum
from posttrain.sync.client import EngineClient

pytest.importorskip("uvicorn")
TESTS_DIR = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("model"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with server_process(lambda port: [sys.executable, "-m", "posttrain", "serve", "--model", model_dir, "--port",
                                      str(port), "--device", "cpu", "--enable-tensor-updates"],
                        log, env=env, timeout_s=90) as (url, _):
        yield model_dir, url


def run_args(model_dir, url, out, mode, max_steps=2):
    return [
        "grpo", f"model.path={model_dir}", f"trainer.output_dir={out}", f"trainer.max_steps={max_steps}",
        "rollout.batch_size=4", "rollout.group_size=2", "rollout.max_new_tokens=8", "trainer.mini_batch_size=4",
        "trainer.micro_batch_size=4", "trainer.lr=1e-2", "data.arithmetic.num_train=16",
        "data.arithmetic.num_validation=4", "validation.every=0", "validation.at_start=false",
        "validation.at_end=false", "env.cls=toy_envs.RandomRewardEnv", "env.num_workers=1", "checkpoint.every=0",
        "logging.progress_bar=false", "rollout.backend=openai", f"rollout.base_url={url}/v1", f"sync.mode={mode}",
        "sync.collective_timeout_s=60",
    ]


@pytest.mark.parametrize("mode", ["broadcast", "checkpoint", "shared"])
def test_grpo_with_a_served_engine_ends_with_equal_weights(server, tmp_path, mode, monkeypatch):
    model_dir, url = server
    monkeypatch.syspath_prepend(TESTS_DIR)  # toy_envs for the reward workers
    out = tmp_path / "run"
    assert main(run_args(model_dir, url, out, mode)) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # shared: the server computes with the trainer's own parameter memory (CPU shared memory here).
    assert all((m["sync/bytes"] == 0) if mode == "shared" else (m["sync/bytes"] > 0) for m in steps)
    assert all(m["sync/seconds"] > 0 for m in steps)
    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000002")
    assert weights_checksum(trained) != weights_checksum(AutoModelForCausalLM.from_pretrained(model_dir))
    client = EngineClient(url)
    assert client.weights_checksum() == weights_checksum(trained)
    if mode != "shared":
        assert client.weight_version()["weight_version"] == "2"


def test_resume_pushes_the_resumed_weights_to_the_server(server, tmp_path, monkeypatch):
    model_dir, url = server
    monkeypatch.syspath_prepend(TESTS_DIR)
    out = tmp_path / "run"
    assert main(run_args(model_dir, url, out, "checkpoint", max_steps=1)) == 0
    client = EngineClient(url)
    # The server forgets: other weights of the same shape.
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    client.update_weights_from_disk(str(tmp_path / "other"))
    trained = weights_checksum(AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000001"))
    assert client.weights_checksum() != trained
    # Resuming at the last step runs no step: only the forced sync after the resume moves weights.
    assert main(run_args(model_dir, url, out, "checkpoint", max_steps=1) + ["--resume"]) == 0
    assert client.weights_checksum() == trained


def test_lora_policy_moves_only_its_adapter(server, tmp_path, monkeypatch):
    # Last in this file: afterwards the server's model carries the adapter.
    from posttrain.config.schema import ModelConfig
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.models.lora import load_adapter

    import torch

    model_dir, url = server
    monkeypatch.syspath_prepend(TESTS_DIR)
    out = tmp_path / "run"
    EngineClient(url).update_weights_from_disk(model_dir)  # lora moves no base weights: serve model.path's
    assert main(run_args(model_dir, url, out, "auto") + ["model.lora.r=4", "model.lora.alpha=8"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    moved = [m["sync/bytes"] for m in steps if "reward/mean" in m]
    assert len(moved) == 2 and all(0 < b < 200_000 for b in moved)  # the adapter, not the model
    base, _ = load_model_and_tokenizer(ModelConfig(path=model_dir, device="cpu"), torch.device("cpu"))
    trained = load_adapter(base, out / "checkpoints" / "adapter_step_000002", trainable=False)
    assert EngineClient(url).weights_checksum() == weights_checksum(trained)
