"""LoRA: wrapping, the missing-target error, the frozen base as reference, generation, checkpoints, config checks."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.checkpoint.manager import CheckpointManager
from posttrain.config.dpo_schema import DPOConfig
from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig, LoRAConfig, ModelConfig, TrainerConfig
from posttrain.config.sft_schema import SFTConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models import load_model_and_tokenizer, make_token_batch, response_logprobs
from posttrain.models.lora import adapters_disabled, apply_lora, checkpoint_prefix, is_peft_model
from posttrain.sampling import SamplingParams
from posttrain.rollout.hf_engine import HFEngine
from posttrain.trainer.optim import build_optimizer

# Tiny Llama (hidden 32, MLP 64, 2 KV heads of 8): per layer r * (in + out) summed over
# q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32.
LORA_PARAMS_PER_LAYER_R4 = 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)


def tiny_lora(r=4, targets=("all-linear",), seed=0):
    tok = make_tokenizer()
    base = make_tiny_llama(tok, seed=seed)
    return tok, apply_lora(base, LoRAConfig(r=r, alpha=8.0, target_modules=list(targets)))


def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_only_adapter_parameters_train_and_reach_the_optimizer():
    _, model = tiny_lora()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * LORA_PARAMS_PER_LAYER_R4
    optimizer = build_optimizer(model, TrainerConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 2 * LORA_PARAMS_PER_LAYER_R4
    _, qv = tiny_lora(targets=("q_proj", "v_proj"))
    assert sum(p.numel() for p in qv.parameters() if p.requires_grad) == 2 * 4 * (64 + 48)


def test_missing_target_modules_name_the_missing_and_the_available():
    tok = make_tokenizer()
    with pytest.raises(PosttrainError) as err:
        apply_lora(make_tiny_llama(tok), LoRAConfig(r=4, target_modules=["q_proj", "query_key_value", "c_attn"]))
    message = str(err.value)
    assert "query_key_value, c_attn" in message
    for name in ("q_proj", "k_proj", "down_proj", "gate_proj"):
        assert name in message


@torch.no_grad()
def test_fresh_adapters_change_nothing_and_disabled_adapters_give_the_base():
    tok = make_tokenizer()
    base = make_tiny_llama(tok, seed=0).eval()
    ids = torch.tensor([[5, 9, 12, 40, 41]])
    base_logits = base(input_ids=ids).logits.clone()
    _, model = tiny_lora(seed=0)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    perturb_adapters(model)
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    model.train()
    with adapters_disabled(model):
        assert not model.training
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    assert model.training  # mode restored
    assert not torch.allclose(model.eval()(input_ids=ids).logits, base_logits)  # adapters back on


@torch.no_grad()
def test_hf_engine_generates_with_the_peft_model_and_sees_adapter_updates():
    tok, model = tiny_lora()
    engine = HFEngine(model, tok, generation_batch_size=4)
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3)
    groups = engine.generate(prompts, params)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    completion = groups[0][0]
    assert len(completion.logprobs) == len(completion.token_ids) > 0
    # The engine's logprobs (logits_to_keep through peft's forward) match a full forward pass.
    batch = make_token_batch([completion.prompt_token_ids], [completion.token_ids], tok.pad_token_id)
    full = torch.log_softmax(model(input_ids=batch.input_ids).logits, dim=-1)[0]
    start = len(completion.prompt_token_ids) - 1
    expected = [full[start + i, t].item() for i, t in enumerate(completion.token_ids)]
    assert completion.logprobs == pytest.approx(expected, abs=1e-5)
    # An adapter update reaches the engine at once: same modules, no copy, no restart.
    before, _ = response_logprobs(model, batch)
    perturb_adapters(model)
    after, _ = response_logprobs(model, batch)
    assert not torch.allclose(before, after)
    [[greedy]] = engine.generate([completion.prompt_token_ids], SamplingParams(n=1, temperature=0.0, max_tokens=4))
    greedy_batch = make_token_batch([greedy.prompt_token_ids], [greedy.token_ids], tok.pad_token_id)
    assert greedy.logprobs == pytest.approx(response_logprobs(model, greedy_batch)[0][0].tolist(), abs=1e-5)


def test_gradient_checkpointing_with_lora_backpropagates_into_adapters(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    cfg = ModelConfig(path=model_dir, device="cpu", gradient_checkpointing=True, lora=LoRAConfig(r=4))
    model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    assert is_peft_model(model)
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_adapter_checkpoints_save_list_prune_resolve_and_reload(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    cfg = ModelConfig(path=model_dir, device="cpu", lora=LoRAConfig(r=4))
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    perturb_adapters(model)
    manager = CheckpointManager(tmp_path / "run", keep_last=2, prefix=checkpoint_prefix(model))
    paths = [manager.save(step, model, tokenizer, {"x": step}) for step in (1, 2, 3)]
    assert [p.name for p in manager.list()] == ["adapter_step_000002", "adapter_step_000003"]
    assert not paths[0].exists()
    assert manager.latest() == paths[2] == CheckpointManager.resolve(tmp_path / "run")
    files = {p.name for p in paths[2].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    assert CheckpointManager.load_trainer_state(paths[2])["step"] == 3
    # A full-weights checkpoint of a later step in the same run is listed with them.
    CheckpointManager(tmp_path / "run", keep_last=0).save(4, make_tiny_llama(tokenizer), tokenizer, {})
    assert CheckpointManager.resolve(tmp_path / "run").name == "step_000004"

    resumed, _ = load_model_and_tokenizer(cfg, torch.device("cpu"), source=str(paths[2]))
    assert is_peft_model(resumed)
    assert all("lora_" in n for n, p in resumed.named_parameters() if p.requires_grad)
    ids = torch.tensor([[5, 9, 12]])
    torch.testing.assert_close(resumed.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    with pytest.raises(PosttrainError, match="LoRA adapter"):
        load_model_and_tokenizer(ModelConfig(path=model_dir, device="cpu"), torch.device("cpu"), source=str(paths[2]))


@pytest.mark.parametrize("schema,extra", [(GRPOConfig, []), (SFTConfig, ["data.train_path=hf:x"]),
                                          (DPOConfig, ["data.train_path=hf:x"])])
def test_lora_settings_are_validated_for_every_schema(schema, extra):
    cfg = load_config(schema, None, ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj]", *extra])
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(schema, None, extra).model.lora.r == 0  # off by default
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, ["model.lora.r=-1", "model.lora.alpha=0", "model.lora.dropout=1.0", *extra])
    message = str(err.value)
    assert "model.lora.r=-1" in message and "model.lora.alpha=0" in message and "model.lora.dropout=1.0" in message


def test_merge_with_model_path_gives_the_peft_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    cfg = ModelConfig(path=model_dir, device="cpu", lora=LoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    perturb_adapters(model)
    ckpt = CheckpointManager(tmp_path / "run", keep_last=0, prefix="adapter_step").save(1, model, tokenizer, {})
    assert main(["merge", str(ckpt), "--output", str(tmp_path / "merged"), "--model-path", model_dir]) == 0
    assert main(["merge", str(ckpt), "--output", str(tmp_path / "merged")]) == 1  # not empty: refused
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
