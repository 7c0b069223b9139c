"""End to end: every algorithm switch of `posttrain grpo` trains one step of a tiny model on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import save_tiny_model
from posttrain.cli import main
from trainer.test_grpo_e2e import read_metrics, tiny_run_args

FAST = ("env.num_workers=0", "validation.at_start=false", "validation.at_end=false", "checkpoint.every=0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("switches") / "model")


def run(model_dir, out, *extra, steps=1):
    assert main(tiny_run_args(model_dir, out, steps, *FAST, *extra)) == 0
    return read_metrics(out)


def test_rloo(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.advantage=rloo")[1]
    assert m["grad_norm"] > 0 and "kl" in m


def test_reinforce_plus_plus_with_kl_in_reward(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.advantage=reinforce_plus_plus", "algorithm.kl_coef=0.05")[1]
    # The KL is logged (reference logprobs were computed before the advantages) but is not a loss term.
    assert "kl" in m and m["grad_norm"] > 0


def test_reinforce_plus_plus_baseline(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.advantage=reinforce_plus_plus_baseline", "algorithm.kl_coef=0")[1]
    assert m["grad_norm"] > 0


def test_gspo(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.policy_loss=gspo", "algorithm.loss_agg_mode=seq-mean-token-mean",
            "algorithm.ppo_epochs=2")[1]
    # The second epoch is off-policy, so the sequence ratio moves and some sequences may clip.
    assert m["grad_norm"] > 0 and 0 <= m["actor/clip_fraction"] <= 1


def test_dual_clip(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.dual_clip_c=3", "algorithm.ppo_epochs=2")[1]
    assert "actor/dual_clip_fraction" in m and m["grad_norm"] > 0


def test_overlong_penalty_and_mask_truncated(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.overlong_buffer=4", "algorithm.overlong_penalty=0.5",
            "algorithm.mask_truncated=true")[1]
    assert -0.5 <= m["reward/overlong_penalty_mean"] <= 0
    assert m["response/masked_fraction"] == pytest.approx(m["response/truncated_fraction"])


def test_dynamic_sampling_keeps_informative_groups(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "env.cls=toy_envs.SomeGroupsConstantEnv", "algorithm.dynamic_sampling=true",
            "algorithm.max_sampling_rounds=3", "trainer.mini_batch_size=8", "trainer.micro_batch_size=4")[1]
    rounds = m["data/sampling_rounds"]
    assert 1 <= rounds <= 3
    # 2 groups wanted per step and 2 generated per round: kept = min(informative, 2) of 2 * rounds.
    kept = round(m["reward/kept_group_fraction"] * 2 * rounds)
    assert 1 <= kept <= 2
    if rounds > 1:
        assert m["reward/zero_std_groups"] > 0
    assert m["grad_norm"] > 0


def test_dynamic_sampling_resume_is_exact(model_dir, tmp_path):
    extra = ("env.cls=toy_envs.SomeGroupsConstantEnv", "algorithm.dynamic_sampling=true", "checkpoint.every=1")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run(model_dir, interrupted, *extra, steps=1)
    resumed = run(model_dir, interrupted, *extra, "--resume", steps=2)
    uninterrupted = run(model_dir, straight, *extra, steps=2)
    for key in ("reward/mean", "data/sampling_rounds", "reward/kept_group_fraction", "loss/policy", "grad_norm"):
        assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-4, abs=1e-6), key


def test_dynamic_sampling_with_no_informative_group_skips_the_update(model_dir, tmp_path):
    out = tmp_path / "run"
    m = run(model_dir, out, "env.cls=toy_envs.ConstantEnv", "algorithm.dynamic_sampling=true",
            "algorithm.max_sampling_rounds=2", steps=2)
    for step in (1, 2):
        assert m[step]["data/sampling_rounds"] == 2 and m[step]["reward/kept_group_fraction"] == 0
        assert m[step]["actor/skipped_updates"] == 2  # batch 8 / mini-batch 4: both optimizer steps skipped
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    # Two steps of two rounds of 2 prompts: the checkpointed sampler is past all 8 draws.
    assert state["sampler"]["epoch"] * 64 + state["sampler"]["position"] == 8
    final = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000002").state_dict()
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, value in final.items():
        torch.testing.assert_close(value, start[name], msg=name)


def test_truncated_is_correction_with_the_hf_engine_has_unit_weights(model_dir, tmp_path):
    m = run(model_dir, tmp_path / "run", "algorithm.is_correction_cap=2.0")[1]
    # The hf engine samples with the trainer's own weights: its logprobs equal the recomputed ones.
    assert m["actor/is_weight"] == pytest.approx(1.0, abs=1e-4)
    assert m["actor/rollout_logprob_diff"] < 1e-4 and m["grad_norm"] > 0
