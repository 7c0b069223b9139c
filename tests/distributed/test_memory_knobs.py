"""The memory knobs and the multi-process config checks, in one process (fast)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from distributed.ranks import make_config, make_samples
from helpers import make_tiny_llama, make_tokenizer
from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.distributed import balance
from posttrain.errors import ConfigError
from posttrain.trainer.memory import compiled, prepare_for_training
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.policy import policy_update


def _train_step(cfg: GRPOConfig):
    model = prepare_for_training(make_tiny_llama(make_tokenizer()), cfg.trainer, torch.device("cpu"), torch.float32)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    metrics = policy_update(model, optimizer, scheduler, make_samples(1),
                            0, torch.device("cpu"), contextlib.nullcontext,
                            algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                            moe_cfg=cfg.moe)
    return model, optimizer, metrics


def test_bf16_parameters_warn_when_the_learning_rate_rounds_away(caplog):
    cfg = make_config()
    cfg.trainer.param_dtype = "bfloat16"
    cfg.trainer.lr = 2e-5
    with caplog.at_level("WARNING", logger="posttrain.trainer"):
        prepare_for_training(make_tiny_llama(make_tokenizer()), cfg.trainer, torch.device("cpu"), torch.float32)
    assert "learning stalls" in caplog.text and "trainer.lr=2e-05" in caplog.text
    caplog.clear()
    cfg.trainer.lr = 1e-2
    with caplog.at_level("WARNING", logger="posttrain.trainer"):
        prepare_for_training(make_tiny_llama(make_tokenizer()), cfg.trainer, torch.device("cpu"), torch.float32)
    assert "learning stalls" not in caplog.text


def test_bf16_parameters_train_and_keep_bf16_optimizer_states():
    cfg = make_config()
    cfg.trainer.param_dtype = "bfloat16"
    model, optimizer, metrics = _train_step(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.bfloat16}
    reference = make_config()
    _, _, fp32_metrics = _train_step(reference)
    # The same update to bf16 precision.
    assert metrics["loss/policy"] == pytest.approx(fp32_metrics["loss/policy"], abs=2e-2)


@pytest.mark.slow  # compiling with inductor on 2 CPU cores takes tens of seconds
@pytest.mark.timeout(900)
def test_compiled_loss_gives_the_eager_update():
    eager_cfg, compiled_cfg = make_config(), make_config()
    compiled_cfg.trainer.compile_loss = True
    eager, _, eager_metrics = _train_step(eager_cfg)
    fast, _, fast_metrics = _train_step(compiled_cfg)
    assert fast_metrics["loss/policy"] == pytest.approx(eager_metrics["loss/policy"], rel=1e-5, abs=1e-7)
    for a, b in zip(eager.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_is_made_once_per_function():
    def double(x):
        return 2 * x

    assert compiled(double) is compiled(double)


def test_micro_batch_counts_are_evened_out_by_halving_the_heaviest(monkeypatch):
    # Pretend another rank has 4 micro-batches; this one has 2.
    monkeypatch.setattr(balance, "is_distributed", lambda: True)
    monkeypatch.setattr(balance, "all_reduce_max", lambda value: 4.0)
    batches = balance.same_count_across_ranks([[9, 1, 1], [5, 4, 3, 2]], size=lambda x: x)
    assert len(batches) == 4
    assert sorted(x for b in batches for x in b) == [1, 1, 2, 3, 4, 5, 9]
    assert max(sum(b) for b in batches) <= 14  # halves never exceed the heaviest original
    monkeypatch.setattr(balance, "all_reduce_max", lambda value: 9.0)
    with pytest.raises(Exception, match="equally many samples"):
        balance.same_count_across_ranks([[9, 1, 1], [5, 4, 3, 2]], size=lambda x: x)  # 7 samples, 9 needed


def test_rank_share_splits_every_mini_batch(monkeypatch):
    monkeypatch.setattr(balance, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(balance, "get_rank", lambda: rank)
        shares.append(balance.rank_share(list(range(8)), block=4))  # 8 prompts, mini-batches of 4
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Local mini-batch j of every rank (2 prompts each), together: the one-process mini-batch j.
    assert [shares[0][j * 2:(j + 1) * 2] + shares[1][j * 2:(j + 1) * 2] for j in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert balance.rank_share(list(range(8))) == [4, 5, 6, 7]  # one block: rank 1's contiguous half
    with pytest.raises(Exception, match="evenly"):
        balance.rank_share(list(range(8)), block=3)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.num_processes=2", "rollout.batch_size=24", "rollout.group_size=8", "trainer.mini_batch_size=24",
      "trainer.micro_batch_size=8"], "prompt groups per step"),
    (["trainer.num_processes=4", "trainer.mini_batch_size=64", "rollout.batch_size=128", "trainer.micro_batch_size=16",
      "rollout.group_size=8"], None),
    (["trainer.num_processes=2", "trainer.mini_batch_size=8", "trainer.micro_batch_size=4"], "whole prompt groups"),
    (["trainer.num_processes=2", "algorithm.dynamic_sampling=true"], "dynamic_sampling"),
    (["trainer.num_processes=2", "model.lora.r=8"], "LoRA"),
    (["trainer.fsdp_cpu_offload=true"], "needs trainer.num_processes > 1"),
    (["trainer.num_processes=0"], "must be >= 1"),
])
def test_multi_process_config_checks(overrides, message):
    if message is None:
        assert load_config(GRPOConfig, None, overrides).trainer.num_processes == 4
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, None, overrides)


def test_torchrun_world_size_is_checked_too(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="3 processes"):
        load_config(GRPOConfig, None, [])  # 16 prompt groups do not split over 3 ranks


def test_unsharded_model_full_weights_and_layers():
    from posttrain.distributed import gathered_for_generation, iter_full_weights
    from posttrain.distributed.fsdp import decoder_layers

    model = make_tiny_llama(make_tokenizer(), num_layers=3)
    assert [type(layer).__name__ for layer in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    buckets = list(iter_full_weights(model, bucket_bytes=1))  # every tensor exceeds 1 byte: one per bucket
    assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in model.named_parameters()]
    assert all(len(bucket) == 1 for bucket in buckets)
    with gathered_for_generation(model):  # nothing to gather: a no-op
        assert model(torch.tensor([[5, 6]])).logits.shape == (1, 2, len(make_tokenizer()))
