"""GRPO on a prompt file read on demand (issue 32): the run equals one on the same prompts held as
lists (as before the data streamed), and a resumed run continues with the prompts the
uninterrupted run draws."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_model
from trainer.test_grpo_e2e import read_metrics, tiny_run_args

from posttrain.cli import main
from posttrain.data.prompts import load_prompt_data

STABLE = ("reward/mean", "response/length_mean", "loss/policy", "grad_norm", "entropy", "kl")


def _prompt_file(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Write {i} then {i * 7 % 10}.", "expected_answer": str(i)} for i in range(40)]
    rows.insert(5, {"prompt": "x" * 300, "expected_answer": "0"})  # dropped: over data.max_prompt_tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_streamed_prompts_train_as_lists_did_and_resume_exactly(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    data = ["data.task=prompts", f"data.train_path={_prompt_file(tmp_path)}", "data.validation_size=4",
            "data.max_prompt_tokens=64"]
    interrupted, streamed, as_lists = tmp_path / "interrupted", tmp_path / "streamed", tmp_path / "lists"
    assert main(tiny_run_args(model_dir, interrupted, 2, *data)) == 0
    assert main(tiny_run_args(model_dir, interrupted, 3, *data, "--resume")) == 0
    assert main(tiny_run_args(model_dir, streamed, 3, *data)) == 0
    with monkeypatch.context() as m:  # the prompts as lists in memory, as load_prompt_data returned them before
        m.setattr("posttrain.trainer.setup.load_prompt_data",
                  lambda cfg, seed: tuple(list(part) for part in load_prompt_data(cfg, seed)))
        assert main(tiny_run_args(model_dir, as_lists, 3, *data)) == 0
    resumed, straight, lists = read_metrics(interrupted), read_metrics(streamed), read_metrics(as_lists)
    assert sorted(resumed) == sorted(straight) == sorted(lists) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in STABLE:
            assert straight[step][key] == pytest.approx(lists[step][key], rel=1e-5, abs=1e-7), (step, key)
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-4, abs=1e-6), (step, key)
    prompts = [[(r["step"], r["prompt"]) for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())]
               for run in (streamed, as_lists, interrupted)]
    assert prompts[0] and prompts[0] == prompts[1]
    logged = {step for step, _ in prompts[0]} & {step for step, _ in prompts[2]}  # samples are logged every few steps
    assert logged and [p for p in prompts[0] if p[0] in logged] == [p for p in prompts[2] if p[0] in logged]
