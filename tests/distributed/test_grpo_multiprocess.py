"""End to end: `posttrain grpo trainer.num_processes=2` on CPU re-launches itself on 2 gloo ranks,
trains a tiny model, writes sharded checkpoints that resume exactly, and `posttrain convert` turns
one into a Hugging Face folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import save_tiny_model
from posttrain.cli import main

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_args(model_dir, out_dir, max_steps, *extra):
    return [
        "grpo", f"model.path={model_dir}", f"trainer.output_dir={out_dir}", f"trainer.max_steps={max_steps}",
        "trainer.num_processes=2", "rollout.batch_size=8", "rollout.group_size=2", "rollout.max_new_tokens=12",
        "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-3", "algorithm.kl_coef=0.01",
        "data.arithmetic.num_train=64", "data.arithmetic.num_validation=8", "validation.max_prompts=4",
        "validation.every=0", "validation.at_start=false", "env.cls=toy_envs.DigitFractionEnv", "env.num_workers=1",
        "checkpoint.every=1", "checkpoint.keep_last=0", "logging.progress_bar=false", *extra,
    ]


def step_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "reward/mean" in m}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_grpo_resumes_exactly_and_converts(tmp_path, monkeypatch):
    # The workers are new interpreters: they find the toy environment through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir = save_tiny_model(tmp_path / "model")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    assert main(run_args(model_dir, straight, 2)) == 0
    metrics = step_metrics(straight)
    assert sorted(metrics) == [1, 2]
    for key in ("reward/mean", "loss/policy", "kl", "grad_norm", "time/train", "response/length_mean"):
        assert key in metrics[2], key
    # 4 prompt groups of 2 per step, over 2 ranks: the metrics count all 8 completions.
    ckpt = straight / "checkpoints" / "step_000001"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "fsdp-dcp" and state["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    assert main([*run_args(model_dir, resumed, 2), "--resume", str(ckpt)]) == 0
    again = step_metrics(resumed)
    assert sorted(again) == [2]
    for key in ("reward/mean", "loss/policy", "kl", "grad_norm", "response/length_mean"):
        assert again[2][key] == pytest.approx(metrics[2][key], rel=1e-5, abs=1e-7), key

    # DCP stores global shapes: one process resumes the 2-rank checkpoint (and writes HF checkpoints).
    single = tmp_path / "single"
    # --resume continues with the run's saved settings: one process is asked for explicitly.
    one_process = [a for a in run_args(model_dir, single, 2) if a != "trainer.num_processes=2"] + ["trainer.num_processes=1"]
    assert main([*one_process, "--resume", str(ckpt)]) == 0
    assert sorted(step_metrics(single)) == [2]
    AutoModelForCausalLM.from_pretrained(single / "checkpoints" / "step_000002")

    hf = tmp_path / "hf"
    assert main(["convert", str(straight), str(hf)]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf)
    converted_again = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    # Trained: the weights moved away from the starting model.
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, converted_again.model.layers[0].mlp.up_proj.weight)


def test_config_errors_stop_before_any_process_starts(tmp_path, capsys):
    assert main(run_args(tmp_path / "none", tmp_path / "run", 1, "rollout.batch_size=6")) == 2
    assert "must split evenly over the ranks" in capsys.readouterr().err
