"""End to end: `posttrain ppo` trains a tiny random model and its critic on CPU, checkpoints, resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import save_tiny_model
from posttrain.cli import main
from trainer.test_grpo_e2e import read_metrics


def ppo_args(model_dir, out_dir, max_steps, *extra):
    return [
        "ppo",
        f"model.path={model_dir}",
        f"trainer.output_dir={out_dir}",
        f"trainer.max_steps={max_steps}",
        "rollout.batch_size=8",
        "rollout.max_new_tokens=12",
        "trainer.mini_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.lr=1e-3",
        "critic.lr=1e-3",
        "algorithm.kl_coef=0.01",
        "data.arithmetic.difficulty=2",
        "data.arithmetic.num_train=64",
        "data.arithmetic.num_validation=8",
        "validation.at_start=false",
        "validation.at_end=false",
        "env.cls=toy_envs.DigitFractionEnv",
        "env.num_workers=0",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "logging.progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ppo") / "model")


def test_two_steps_checkpoint_and_resume_match_uninterrupted_run(model_dir, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert main(ppo_args(model_dir, interrupted, 2)) == 0
    metrics = read_metrics(interrupted)
    assert sorted(metrics) == [1, 2]
    for key in ("reward/mean", "loss/policy", "kl", "entropy", "grad_norm", "lr", "actor/clip_fraction",
                "critic/value_loss", "critic/explained_variance", "critic/values_mean", "critic/returns_mean",
                "critic/advantages_mean", "critic/advantages_std", "critic/grad_norm", "critic/lr"):
        assert key in metrics[2], key
    assert metrics[1]["critic/values_mean"] == 0.0  # zero-initialised head
    # The engine runs the trainer's modules: every token comes from the version the step started from.
    assert metrics[2]["off_policy/staleness_max"] == 0.0 and metrics[2]["off_policy/staleness_hist/0"] == 1.0
    samples = [json.loads(line) for line in (interrupted / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    for s in samples:  # 2 optimizer steps per step (batch 8 / mini-batch 4)
        assert s["version"] == 2 * (s["step"] - 1) and s["token_versions"] == [s["version"]] * len(s["tokens"])
    assert metrics[2]["critic/values_mean"] != 0.0 and metrics[2]["critic/value_loss"] > 0
    ckpt = interrupted / "checkpoints" / "step_000002"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert (ckpt / "critic" / "value_head.pt").is_file() and (ckpt / "critic" / "optimizer.pt").is_file()

    assert main(ppo_args(model_dir, interrupted, 3, "--resume")) == 0
    assert main(ppo_args(model_dir, straight, 3)) == 0
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(straight)
    assert sorted(resumed) == [1, 2, 3]
    for key in ("reward/mean", "loss/policy", "grad_norm", "kl", "critic/value_loss", "critic/values_mean",
                "critic/grad_norm"):
        assert resumed[3][key] == pytest.approx(uninterrupted[3][key], rel=1e-4, abs=1e-6), key
    for part in ("model.safetensors", "critic/model.safetensors"):
        a = load_file(interrupted / "checkpoints" / "step_000003" / part)
        b = load_file(straight / "checkpoints" / "step_000003" / part)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_critic_warmup_leaves_policy_unchanged(model_dir, tmp_path):
    out = tmp_path / "warmup"
    assert main(ppo_args(model_dir, out, 2, "critic.warmup_steps=2", "checkpoint.every=0")) == 0
    metrics = read_metrics(out)
    assert metrics[2]["critic/warmup"] == 1.0 and "loss/policy" not in metrics[2]
    start = load_file(f"{model_dir}/model.safetensors")
    end = load_file(out / "checkpoints" / "step_000002" / "model.safetensors")
    for name in start:
        torch.testing.assert_close(end[name], start[name], rtol=0, atol=0)
    critic_start = {k.removeprefix("model."): v for k, v in start.items()}
    critic_end = load_file(out / "checkpoints" / "step_000002" / "critic" / "model.safetensors")
    assert any(not torch.equal(critic_end[k], critic_start[k]) for k in critic_end)


def test_one_optimizer_step_per_step_takes_old_logprobs_from_the_update(model_dir, tmp_path, monkeypatch):
    """Step 1 warms the critic up (no policy update): the old logprobs get their own pass. Step 2
    makes one optimizer step: the update's forward pass gives them, and the mismatch is still logged."""
    from posttrain.trainer import ppo

    passes = []
    original = ppo.recompute_old_logprobs
    monkeypatch.setattr(ppo, "recompute_old_logprobs", lambda *a, **k: passes.append(1) or original(*a, **k))
    out = tmp_path / "one_step"
    assert main(ppo_args(model_dir, out, 2, "trainer.mini_batch_size=8", "critic.warmup_steps=1",
                         "checkpoint.every=0")) == 0
    metrics = read_metrics(out)
    assert len(passes) == 1  # step 1 only
    for step in (1, 2):
        assert metrics[step]["rollout/logprob_mismatch_mean"] >= 0  # logged either way
    assert "loss/policy" in metrics[2] and metrics[2]["actor/clip_fraction"] == 0.0  # ratio exactly 1


def test_group_size_1_allowed_for_ppo_not_grpo(capsys):
    assert main(["ppo", "--print-config"]) == 0
    assert "group_size: 1" in capsys.readouterr().out
    assert main(["grpo", "--print-config", "rollout.group_size=1"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reward_rises_on_trivial_task(model_dir, tmp_path):
    """A tiny random model learns to emit digits (reward = digit fraction) with PPO within a CPU minute."""
    out = tmp_path / "learn"
    args = ppo_args(model_dir, out, 30, "rollout.batch_size=32", "trainer.mini_batch_size=32",
                    "trainer.micro_batch_size=32", "trainer.lr=1e-2", "critic.lr=1e-2", "rollout.max_new_tokens=8",
                    "algorithm.kl_coef=0", "checkpoint.every=0")
    assert main(args) == 0
    rewards = [m["reward/mean"] for _, m in sorted(read_metrics(out).items())]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
