"""DPO recipe: one-forward pair batches, exact accumulation, the CLI end to end, exact resume, learning."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.cli import main
from posttrain.config.dpo_schema import DPOConfig
from posttrain.data.preference import PreferencePair
from posttrain.models import make_token_batch, response_logprobs
from posttrain.trainer.dpo import preference_update
from posttrain.trainer.dpo_reference import REFERENCE_FILE, compute_reference_logps, pair_token_logps
from posttrain.trainer.optim import build_optimizer, build_scheduler

CPU = torch.device("cpu")


def _random_pairs(n=4):
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(4, 90, (k,), generator=g).tolist()  # noqa: E731
    return [PreferencePair(ids(3 + i % 3), ids(2 + i), ids(5 - i % 2)) for i in range(n)]


def test_chosen_and_rejected_share_one_forward_and_match_separate_passes():
    model = make_tiny_llama(make_tokenizer()).eval()
    pairs = _random_pairs(3)
    with torch.no_grad():
        logprobs, mask = pair_token_logps(model, pairs, 0, CPU, contextlib.nullcontext)
    assert logprobs.shape[0] == 6
    assert mask.sum(dim=1).tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    for row, (prompt, response) in enumerate([(p.prompt_ids, p.chosen_ids) for p in pairs]
                                             + [(p.prompt_ids, p.rejected_ids) for p in pairs]):
        with torch.no_grad():
            alone, _ = response_logprobs(model, make_token_batch([prompt], [response], 0))
        torch.testing.assert_close(logprobs[row, : len(response)], alone[0], rtol=1e-4, atol=1e-5)


def _update(model, pairs, micro_batch_size, loss_type):
    cfg = DPOConfig()
    cfg.trainer.batch_size, cfg.trainer.micro_batch_size = len(pairs), micro_batch_size
    cfg.trainer.lr, cfg.trainer.warmup_steps = 1e-2, 0
    cfg.trainer.adam_eps = 1.0  # keeps Adam's first step linear in the gradient (see test_policy_update)
    cfg.algorithm.loss_type, cfg.algorithm.beta = loss_type, 0.5
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    return preference_update(model, optimizer, scheduler, pairs, cfg.algorithm, cfg.trainer, 0, CPU, contextlib.nullcontext)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_micro_batch_split_does_not_change_the_update(loss_type):
    tokenizer = make_tokenizer()
    pairs = _random_pairs(4)
    # A reference different from the policy, so the margins (and gradients) are not trivial.
    compute_reference_logps(make_tiny_llama(tokenizer, seed=1), pairs, micro_batch_size=3, pad_token_id=0,
                            device=CPU, autocast=contextlib.nullcontext)
    base = make_tiny_llama(tokenizer, seed=0)
    whole, split = copy.deepcopy(base), copy.deepcopy(base)
    m_whole = _update(whole, pairs, 4, loss_type)
    m_split = _update(split, pairs, 1, loss_type)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen", "grad_norm"):
        assert m_whole[key] == pytest.approx(m_split[key], rel=1e-5, abs=1e-7), key
    assert m_whole["loss"] > 0 and not torch.equal(next(base.parameters()), next(whole.parameters()))


def write_pairs(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}? ok?", "chosen": "yes", "rejected": "no"}) + "\n")
    return str(path)


def run_args(model_dir, data, out_dir, max_steps, *extra):
    return ["dpo", f"model.path={model_dir}", f"data.train_path={data}", f"trainer.output_dir={out_dir}",
            f"trainer.max_steps={max_steps}", "trainer.batch_size=4", "trainer.micro_batch_size=2",
            "trainer.lr=1e-3", "trainer.warmup_steps=1", "trainer.eval_every=0", "data.validation_size=4",
            "checkpoint.every=1", "checkpoint.keep_last=2", "logging.progress_bar=false", *extra]


def read_metrics(run_dir, key="loss"):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if key in m}


def test_cli_two_steps_checkpoint_and_exact_resume(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    assert main(run_args(model_dir, data, interrupted, 2)) == 0
    metrics = read_metrics(interrupted)
    assert sorted(metrics) == [1, 2]
    for key in ("loss", "rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "perf/tokens_per_s"):
        assert key in metrics[2], key
    assert metrics[1]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    val = read_metrics(interrupted, "val/loss")
    assert sorted(val) == [2] and {"val/rewards/accuracy", "val/rewards/margins"} <= set(val[2])
    ckpt = interrupted / "checkpoints" / "step_000002"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert (interrupted / REFERENCE_FILE).is_file()

    # Resume once with the cached reference logprobs and once recomputing them from the base model.
    recomputed = tmp_path / "recomputed"
    shutil.copytree(interrupted, recomputed)
    (recomputed / REFERENCE_FILE).unlink()
    assert main(run_args(model_dir, data, interrupted, 3, "--resume")) == 0
    assert main(run_args(model_dir, data, recomputed, 3, "--resume")) == 0
    assert main(run_args(model_dir, data, straight, 3)) == 0
    expected = read_metrics(straight)
    final = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step_000003").state_dict()
    for run in (interrupted, recomputed):
        resumed = read_metrics(run)
        assert sorted(resumed) == [1, 2, 3]
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "lr"):
            assert resumed[3][key] == pytest.approx(expected[3][key], rel=1e-5, abs=1e-7), key
        weights = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000003").state_dict()
        for name in final:
            torch.testing.assert_close(weights[name], final[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_ctrl_c_saves_the_last_completed_step(tmp_path, monkeypatch):
    import posttrain.trainer.dpo as dpo

    calls = []

    def interrupt_on_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    update = dpo.preference_update
    monkeypatch.setattr(dpo, "preference_update", interrupt_on_second_step)
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    assert main(run_args(model_dir, write_pairs(tmp_path / "pairs.jsonl", 12), out, 5, "checkpoint.every=0")) == 130
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]
    assert sorted(read_metrics(out)) == [1]


def test_bad_data_and_bad_config_fail_cleanly(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "good": "y", "rejected": "n"}) + "\n")
    assert main(run_args(model_dir, bad, tmp_path / "run", 1, "data.validation_size=0")) == 1
    err = capsys.readouterr().err
    assert "row 1" in err and "'chosen'" in err and "data.chosen_column" in err
    assert main(["dpo", "trainer.micro_batch_size=3", f"data.train_path={bad}"]) == 2
    assert "trainer.micro_batch_size=3 must divide trainer.batch_size=32" in capsys.readouterr().err
    assert main(["dpo", "--print-config", f"data.train_path={bad}", "algorithm.loss_type=ipo"]) == 0
    assert "loss_type: ipo" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preference_margin_and_accuracy_rise(tmp_path):
    """A tiny random model learns to prefer 'yes' over 'no' on held-out prompts within seconds."""
    model_dir = save_tiny_model(tmp_path / "model")
    train = write_pairs(tmp_path / "train.jsonl", 96, seed=1)
    val = write_pairs(tmp_path / "val.jsonl", 16, seed=2)
    out = tmp_path / "learn"
    args = run_args(model_dir, train, out, 0, f"data.validation_path={val}", "trainer.num_epochs=4",
                    "trainer.batch_size=16", "trainer.micro_batch_size=16", "trainer.lr=5e-3",
                    "trainer.lr_scheduler=constant",
                    "trainer.eval_every=4", "checkpoint.every=0", "logging.console_every=0")
    assert main(args) == 0
    val_metrics = [m for _, m in sorted(read_metrics(out, "val/loss").items())]
    assert len(read_metrics(out)) == 24  # max_steps=0: 4 epochs x 96 pairs / 16 per step
    margins = [m["val/rewards/margins"] for m in val_metrics]
    # At step 0 the policy is the reference: margin 0, loss log 2 = 0.693.
    assert all(b > a for a, b in zip(margins, margins[1:])) and margins[-1] > 1.0, margins
    assert val_metrics[-1]["val/rewards/accuracy"] > 0.9
    assert val_metrics[-1]["val/loss"] < 0.3, val_metrics[-1]


@pytest.mark.parametrize("epochs,cross", [(1, False), (2, False), (1, True)])
def test_num_epochs_with_fewer_pairs_than_a_batch_and_dry_run_agrees(tmp_path, capsys, caplog, epochs, cross):
    """8 pairs and trainer.batch_size=32: num_epochs steps of the 8 pairs, none repeated within a
    step, unless trainer.steps_cross_epochs=true asks for full batches."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    run_dir = tmp_path / "run"
    args = ["dpo", f"model.path={model_dir}", "model.device=cpu", f"data.train_path={data}",
            f"trainer.output_dir={run_dir}", "data.validation_size=0", "trainer.batch_size=32",
            "trainer.micro_batch_size=8", f"trainer.num_epochs={epochs}", f"trainer.steps_cross_epochs={cross}",
            "logging.progress_bar=false"]
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    with caplog.at_level("INFO"):
        assert main(args) == 0
    metrics = read_metrics(run_dir)
    if cross:
        assert sorted(metrics) == [1] and metrics[1]["data/pairs"] == 32 and metrics[1]["data/epoch"] == 4
        assert "every step trains about 4 epochs" in caplog.text
    else:
        assert sorted(metrics) == list(range(1, epochs + 1))
        assert [m["data/pairs"] for m in metrics.values()] == [8.0] * epochs
        assert [m["data/epoch"] for m in metrics.values()] == [float(e) for e in range(1, epochs + 1)]
        assert "The 8 training pairs are fewer than trainer.batch_size=32: each step is one pass" in caplog.text
    assert f"for {len(metrics)} steps" in out
    trained = float(out.split("\n  trained ", 1)[1].split("(")[0].replace(",", ""))
    assert trained == pytest.approx(metrics[1]["perf/tokens_per_s"] * metrics[1]["time/step"], rel=1e-6)
