"""FSDP2 on 2 gloo ranks (CPU): a policy update equals one process's (also with CPU offload, and
with activation checkpointing; a sharded critic's step too), the full-weight iterator yields every
parameter whole, resume from a sharded checkpoint equals an uninterrupted run, `posttrain convert`
gives a folder transformers loads with the same weights, and ranks generate different lengths (or
alone) with a sharded model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed.ranks import (
    build, critic_step, generate_unequal_lengths, make_config, make_samples, run_on_ranks, train_checkpoint_resume,
    update,
)
from helpers import make_tiny_llama, make_tokenizer
from posttrain.cli import main

# (loss mode, micro_batch_tokens, CPU offload): packed token-budget micro-batches (14 tokens: the
# ranks get different counts, which the trainer must even out), and padded sample-count ones with
# parameters, gradients and optimizer states offloaded to CPU memory.
CASES = [("token-mean", 14, False), ("seq-mean-token-mean", 0, True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{t}{'-offload' * o}" for m, t, o in CASES])
def two_rank_run(request, tmp_path_factory):
    mode, micro_batch_tokens, cpu_offload = request.param
    workdir = tmp_path_factory.mktemp("fsdp")
    run_on_ranks(train_checkpoint_resume, str(workdir), mode, micro_batch_tokens, cpu_offload)
    straight = torch.load(workdir / "straight.pt", weights_only=False)
    resumed = torch.load(workdir / "resumed.pt", weights_only=False)
    return mode, micro_batch_tokens, workdir, straight, resumed


def _assert_same_weights(expected: dict, actual: dict, atol: float = 2e-6) -> None:
    assert set(expected) == set(actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=name)


def test_two_ranks_give_the_one_process_update(two_rank_run):
    mode, micro_batch_tokens, _, straight, _ = two_rank_run
    cfg = make_config(mode, micro_batch_tokens)
    model, _, optimizer, scheduler = build(cfg)  # one process: not sharded
    start = copy.deepcopy(model.state_dict())
    metrics = update(model, optimizer, scheduler, cfg, make_samples(1))
    _assert_same_weights(model.state_dict(), straight["state"])
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], straight["state"]["model.layers.0.mlp.up_proj.weight"])
    for key in ("loss/policy", "grad_norm", "kl", "entropy", "actor/clip_fraction"):
        assert straight["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-7), key


def test_full_weight_iterator_yields_every_parameter_whole(two_rank_run):
    _, _, _, straight, _ = two_rank_run
    buckets = straight["buckets"]
    assert len(buckets) > 1  # 8 KiB buckets: several, each bounded
    yielded = {name: tensor for bucket in buckets for name, tensor in bucket}
    assert sum(len(bucket) for bucket in buckets) == len(yielded)  # each once
    reference = make_tiny_llama(make_tokenizer())
    expected = dict(reference.named_parameters())  # tied lm_head/embedding: listed once
    assert list(yielded) == list(expected)
    for name, tensor in yielded.items():
        assert tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, straight["state"][name])


def test_resume_from_sharded_checkpoint_equals_uninterrupted(two_rank_run):
    _, _, workdir, straight, resumed = two_rank_run
    assert resumed["trainer_state"]["step"] == 1 and resumed["trainer_state"]["world_size"] == 2
    _assert_same_weights(straight["state2"], resumed["state2"], atol=1e-7)
    assert resumed["metrics2"]["loss/policy"] == pytest.approx(straight["metrics2"]["loss/policy"], rel=1e-6)


def test_convert_writes_a_folder_transformers_loads(two_rank_run, tmp_path):
    _, _, workdir, straight, _ = two_rank_run
    output = tmp_path / "hf"
    assert main(["convert", str(workdir / "run"), str(output)]) == 0  # run folder: its latest checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(output)
    _assert_same_weights(straight["state"], loaded.state_dict(), atol=0)
    assert loaded(torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    assert main(["convert", str(workdir / "run"), str(output)]) == 1  # never overwrites a model


def test_sharded_generation_needs_no_matching_collectives_and_checkpointed_training_matches(tmp_path):
    run_on_ranks(generate_unequal_lengths, str(tmp_path))
    ranks = [torch.load(tmp_path / f"gen_rank{r}.pt") for r in range(2)]
    model = make_tiny_llama(make_tokenizer()).eval()  # the same weights, unsharded
    for rank, result in enumerate(ranks):
        new_tokens = 3 + 6 * rank
        expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(result["tokens"], expected)
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the same global loss on both ranks
    cfg = make_config()  # one process, no activation checkpointing: the same loss
    model, _, optimizer, scheduler = build(cfg)
    assert update(model, optimizer, scheduler, cfg, make_samples(1))["loss/policy"] == pytest.approx(ranks[0]["loss"], rel=1e-5)
    # The PPO critic (value head model) shards the same way and takes the one-process step.
    critic = critic_step(make_samples(1))
    _assert_same_weights(critic.state_dict(), torch.load(tmp_path / "critic.pt"))
    start = make_tiny_llama(make_tokenizer()).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(critic.state_dict()["backbone.layers.0.mlp.up_proj.weight"], start)  # it trained
