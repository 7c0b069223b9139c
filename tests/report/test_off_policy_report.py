"""The report's off-policy panels from a real tiny asynchronous GRPO run on CPU with a correction
on (issue 30): the lines drawn are exactly the off_policy/* series of metrics.jsonl, and those
say what the run did (stale tokens, icepop masking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.report import load_run
from posttrain.report.plots import make_plots

pytest.importorskip("matplotlib")

MAX_STEPS = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """4 async steps, one replica generating one version ahead (max_staleness=1); icepop keeps the
    tokens whose ratio is within 2% of 1, so the stale ones (a large lr moves the policy) are masked."""
    root = tmp_path_factory.mktemp("off_policy_run")
    model_dir = save_tiny_model(root / "model")
    out = root / "run"
    assert main([
        "grpo", f"model.path={model_dir}", f"trainer.output_dir={out}", f"trainer.max_steps={MAX_STEPS}",
        "rollout.batch_size=8", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "trainer.mini_batch_size=8", "trainer.micro_batch_size=4", "trainer.lr=2e-2",
        "rollout.mode=async", "rollout.max_staleness=1", "rollout.num_replicas=1",
        "algorithm.off_policy_correction=icepop", "algorithm.off_policy_low=0.98", "algorithm.off_policy_high=1.02",
        "data.arithmetic.difficulty=2", "data.arithmetic.num_train=64", "validation.at_start=false",
        "validation.every=0", "validation.at_end=false", "env.cls=toy_envs.DigitFractionEnv", "env.num_workers=1",
        "checkpoint.every=0", "logging.progress_bar=false", "logging.samples_every=1", "logging.samples_per_write=8",
    ]) == 0
    return out


def test_off_policy_panels_draw_the_logged_series(run_dir, tmp_path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, MAX_STEPS + 1))
    # Step 2's batch was admitted before step 1's weights went out: one version stale.
    assert steps[1]["off_policy/staleness_max"] == 1.0
    assert any(r["off_policy/masked_fraction"] > 0 for r in steps)  # icepop dropped stale tokens
    for r in steps:
        assert r["off_policy/is_ratio_p05"] <= r["off_policy/is_ratio_p50"] <= r["off_policy/is_ratio_p95"] \
            <= r["off_policy/is_ratio_max"]
        assert r["off_policy/mismatch_kl"] >= 0
        assert 0 <= r["off_policy/dropped_seq_fraction"] <= r["off_policy/masked_seq_fraction"] <= 1

    plots = {plot.panel.name: plot for plot in make_plots([load_run(run_dir)])}
    expected = {
        "off_policy_ratio": ["off_policy/is_ratio_p05", "off_policy/is_ratio_p50", "off_policy/is_ratio_p95",
                             "off_policy/is_ratio_max"],
        "off_policy": ["off_policy/mismatch_kl", "off_policy/masked_fraction", "off_policy/masked_seq_fraction",
                       "off_policy/dropped_seq_fraction"],
    }
    for name, keys in expected.items():
        lines = plots[name].figure.axes[0].get_lines()
        assert [line.get_label() for line in lines] == keys
        for line in lines:  # every line drawn is exactly the metric's logged (step, value) series
            logged = [(r["step"], r[line.get_label()]) for r in records if line.get_label() in r]
            assert [(int(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())] == logged
    staleness = {line.get_label() for line in plots["staleness"].figure.axes[0].get_lines()}
    assert {"off_policy/staleness_mean", "off_policy/staleness_max"} <= staleness

    # The HTML report holds both panels.
    assert main(["report", str(run_dir), "--output", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<figure id="plot-off_policy">' in page and '<figure id="plot-off_policy_ratio">' in page


def test_samples_record_the_version_of_every_token(run_dir):
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        assert len(s["token_versions"]) == len(s["tokens"])
        # Trained by version step - 1, at most max_staleness=1 behind.
        assert all(s["step"] - 2 <= v <= s["step"] - 1 for v in s["token_versions"])
