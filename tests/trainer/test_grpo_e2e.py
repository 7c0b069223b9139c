"""End to end: the CLI trains a tiny random model with GRPO on CPU, checkpoints, and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import save_tiny_model
from posttrain.cli import main


def tiny_run_args(model_dir, out_dir, max_steps, *extra):
    return [
        "grpo",
        f"model.path={model_dir}",
        f"trainer.output_dir={out_dir}",
        f"trainer.max_steps={max_steps}",
        "rollout.batch_size=8",
        "rollout.group_size=4",
        "rollout.max_new_tokens=12",
        "trainer.mini_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.lr=1e-3",
        "algorithm.kl_coef=0.01",
        "data.arithmetic.difficulty=2",
        "data.arithmetic.num_train=64",
        "data.arithmetic.num_validation=8",
        "validation.max_prompts=4",
        "validation.every=0",
        "env.cls=toy_envs.DigitFractionEnv",
        "env.num_workers=1",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "logging.progress_bar=false",
        *extra,
    ]


def read_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "reward/mean" in m}


def test_two_steps_checkpoint_and_resume_match_uninterrupted_run(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    assert main(tiny_run_args(model_dir, interrupted, 2)) == 0
    metrics = read_metrics(interrupted)
    assert sorted(metrics) == [1, 2]
    for key in ("reward/mean", "loss/policy", "kl", "entropy", "grad_norm", "lr", "perf/tokens_per_s",
                "time/generate", "time/score", "time/train", "response/length_mean", "actor/clip_fraction",
                "engine/preemptions", "engine/kv_blocks", "engine/cuda_graph_captures"):
        assert key in metrics[2], key
    assert metrics[2]["engine/prefix_cache_hit_tokens"] > 0  # each group's 4 samples shared its prompt's blocks
    ckpt = interrupted / "checkpoints" / "step_000002"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2

    assert main(tiny_run_args(model_dir, interrupted, 3, "--resume")) == 0
    assert main(tiny_run_args(model_dir, straight, 3)) == 0
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(straight)
    assert sorted(resumed) == [1, 2, 3]
    for key in ("reward/mean", "response/length_mean", "loss/policy", "grad_norm", "entropy", "kl"):
        assert resumed[3][key] == pytest.approx(uninterrupted[3][key], rel=1e-4, abs=1e-6), key
    final_a = AutoModelForCausalLM.from_pretrained(interrupted / "checkpoints" / "step_000003").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step_000003").state_dict()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)
    # keep_last=2 pruned step 1
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_config_typo_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["grpo", "trainer.lrr=1e-6", f"trainer.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.lrr" in err and "trainer.lr" in err
    assert list(tmp_path.iterdir()) == []


def test_prompts_without_answer_column_fail_before_model_loads(tmp_path, capsys, monkeypatch):
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model must not load when the data cannot be scored")

    monkeypatch.setattr("posttrain.trainer.builder.load_model_and_tokenizer", no_model_load)
    out = tmp_path / "run"
    args = ["grpo", "data.task=prompts", f"data.train_path={data}", "data.validation_size=2", "env.cls=math",
            f"trainer.output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "MathEnvironment" in err and "'expected_answer'" in err
    assert "6 of 6 training prompts lack it" in err and "data.answer_column=answer" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_print_config_shows_resolved_values(capsys):
    assert main(["grpo", "--print-config", "trainer.lr=3e-6", "rollout.group_size=4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-06" in out or "lr: 3e-06" in out
    assert "group_size: 4" in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reward_rises_on_trivial_task(tmp_path):
    """A tiny random model learns to emit digits (reward = digit fraction) within a CPU minute."""
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "learn"
    args = tiny_run_args(model_dir, out, 30, "rollout.batch_size=32", "rollout.group_size=8",
                         "trainer.mini_batch_size=32", "trainer.micro_batch_size=32", "trainer.lr=1e-2",
                         "rollout.max_new_tokens=8", "algorithm.kl_coef=0", "checkpoint.every=0",
                         "validation.at_start=false", "validation.at_end=false")
    assert main(args) == 0
    rewards = [m["reward/mean"] for _, m in sorted(read_metrics(out).items())]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards


def test_validation_reports_accuracy_per_level():
    from posttrain.data.chat import TokenizedPrompt
    from posttrain.trainer.validation import _per_level

    prompts = [TokenizedPrompt([1], [], {"level": lvl}) for lvl in (1, 1, 2, 3)]
    scored = [{"correct": c} for c in (True, False, True, False)]
    assert _per_level(prompts, scored, [1.1, 0.0, 1.0, 0.1]) == {
        "val/accuracy_level_1": 0.5, "val/accuracy_level_2": 1.0, "val/accuracy_level_3": 0.0,
    }
    assert _per_level(prompts, [{}] * 4, [1.0, 0.0, 0.5, 0.25])["val/reward_mean_level_1"] == 0.5


def test_overrides_may_come_before_and_after_options(capsys):
    assert main(["grpo", "trainer.lr=3e-6", "--config", "cpu_quick", "rollout.group_size=2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 2" in out and ("lr: 3.0e-06" in out or "lr: 3e-06" in out)
    with pytest.raises(SystemExit):
        main(["grpo", "--no-such-flag"])
