"""LoRA through the CLI: GRPO (reference = base with adapters off, no copy; exact resume), SFT, DPO, merge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import posttrain.trainer.builder as builder
import posttrain.trainer.grpo as grpo
from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.config.schema import LoRAConfig, ModelConfig
from posttrain.models import load_model_and_tokenizer, response_logprobs
from posttrain.models.lora import is_peft_model
from posttrain.trainer.samples import chunks, collate
from test_dpo import run_args as dpo_args
from test_dpo import write_pairs
from test_grpo_e2e import read_metrics, tiny_run_args
from test_sft import sft_args, write_chats

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "tokenizer.json",
                 "optimizer.pt", "scheduler.pt", "rng_state.pt"}


def adapter_weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def test_grpo_lora_reference_is_the_base_without_a_copy_and_resume_is_exact(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def no_copy(*args, **kwargs):
        raise AssertionError("a LoRA run must not copy the model for the reference")

    monkeypatch.setattr(builder, "make_reference_model", no_copy)
    original_fill = grpo.fill_reference_logprobs
    checked = []

    def checking_fill(reference, samples, trainer, rollout, model_cfg, pad_token_id, device, autocast):
        # The reference is the trained policy itself (one set of base weights in memory) ...
        assert is_peft_model(reference) and reference.training
        original_fill(reference, samples, trainer, rollout, model_cfg, pad_token_id, device, autocast)
        assert reference.training  # mode restored for the update
        # ... and its logprobs are the starting base model's, also after the adapters have moved.
        for micro_batch in chunks(samples, 4):
            batch = collate(micro_batch, pad_token_id, device)
            with torch.no_grad():
                expected, _ = response_logprobs(base.to(device), batch.tokens, temperature=rollout.temperature)
            for i, s in enumerate(micro_batch):
                assert s.ref_logprobs == pytest.approx(expected[i, : len(s.response_ids)].tolist(), abs=1e-5)
        checked.append(len(samples))

    monkeypatch.setattr(grpo, "fill_reference_logprobs", checking_fill)
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert main(tiny_run_args(model_dir, interrupted, 2, *LORA)) == 0
    assert checked == [8, 8]
    ckpt = interrupted / "checkpoints" / "adapter_step_000002"
    assert ADAPTER_FILES <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(ckpt).items() if "lora_B" in k)  # adapters trained
    metrics = read_metrics(interrupted)
    # Fresh adapters: policy == reference until the first optimizer step (2 mini-batches per step).
    assert 0 <= metrics[1]["kl"] < 1e-4 and metrics[2]["kl"] > 0

    assert main(tiny_run_args(model_dir, interrupted, 3, *LORA, "--resume")) == 0
    assert main(tiny_run_args(model_dir, straight, 3, *LORA)) == 0
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(straight)
    assert sorted(resumed) == [1, 2, 3]
    for key in ("reward/mean", "response/length_mean", "loss/policy", "grad_norm", "entropy", "kl"):
        assert resumed[3][key] == pytest.approx(uninterrupted[3][key], rel=1e-4, abs=1e-6), key
    final_a = adapter_weights(interrupted / "checkpoints" / "adapter_step_000003")
    final_b = adapter_weights(straight / "checkpoints" / "adapter_step_000003")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["adapter_step_000002",
                                                                               "adapter_step_000003"]

    # posttrain merge: the base comes from the run's config.yaml; merged logits == base + adapter logits.
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(interrupted / "checkpoints" / "adapter_step_000003"), "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    cfg = ModelConfig(path=model_dir, device="cpu", lora=LoRAConfig(r=4, alpha=8.0))
    peft_model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"),
                                             source=str(interrupted / "checkpoints" / "adapter_step_000003"))
    ids = torch.tensor([[5, 9, 12, 40, 41, 7]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file() and not (merged_dir / "adapter_config.json").exists()


def test_sft_one_lora_step(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "sft"
    assert main(sft_args(model_dir, write_chats(tmp_path / "chats.jsonl"), out, 1, *LORA)) == 0
    ckpt = out / "checkpoints" / "adapter_step_000001"
    assert ADAPTER_FILES <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4


def test_dpo_one_lora_step_scores_the_reference_with_the_one_model(tmp_path, monkeypatch):
    import posttrain.trainer.dpo as dpo

    loads = []
    original = dpo.load_model_and_tokenizer
    monkeypatch.setattr(dpo, "load_model_and_tokenizer", lambda *a, **k: loads.append(1) or original(*a, **k))
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "dpo"
    assert main(dpo_args(model_dir, write_pairs(tmp_path / "pairs.jsonl", 12), out, 1, *LORA)) == 0
    assert len(loads) == 1  # the reference logprobs came from the training model, adapters disabled
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m for m in metrics if m["step"] == 1 and "loss" in m][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert ADAPTER_FILES <= {p.name for p in (out / "checkpoints" / "adapter_step_000001").iterdir()}
