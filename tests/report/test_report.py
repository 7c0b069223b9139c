"""`posttrain report` and `posttrain view` on the folder of a real tiny GRPO run (CPU, seconds):
the plots exist and hold the logged values, the sample views hold the logged completions, and
train.log holds the console's lines."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import save_tiny_model
from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.report import load_run, load_runs
from posttrain.report.html import report_page, token_view_page, write_report
from posttrain.report.plots import make_plots, overview_figure, require_matplotlib
from posttrain.report.runs import PANELS, Run, metric_series, panel_keys
from posttrain.report.terminal import render_samples
from posttrain.report.tokens import sample_tokens, samples_at_step, visible

pytest.importorskip("matplotlib")

MAX_STEPS = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-step GRPO run: samples at steps 1, 2 (samples_every=2) and 3 (the last), validation at 0, 2, 3."""
    root = tmp_path_factory.mktemp("tiny_run")
    model_dir = save_tiny_model(root / "model")
    out = root / "run"
    assert main([
        "grpo", f"model.path={model_dir}", f"trainer.output_dir={out}", f"trainer.max_steps={MAX_STEPS}",
        "rollout.batch_size=8", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-3", "algorithm.kl_coef=0.01",
        "data.arithmetic.difficulty=2", "data.arithmetic.num_train=64", "data.arithmetic.num_validation=8",
        "validation.max_prompts=4", "validation.every=2", "env.cls=toy_envs.DigitFractionEnv", "env.num_workers=1",
        "checkpoint.every=0", "logging.progress_bar=false", "logging.samples_every=2", "logging.samples_per_write=8",
    ]) == 0
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_jsonl_holds_per_token_values_of_the_trained_batch(run_dir):
    samples = read_jsonl(run_dir / "samples.jsonl")
    # At most the first mini-batch (4 of the 8 samples): its forward pass precedes every optimizer step.
    assert sorted({s["step"] for s in samples}) == [1, 2, 3]
    assert all(sum(s["step"] == step for s in samples) == 4 for step in (1, 2, 3))
    for s in samples:
        n = len(s["tokens"])
        assert n == len(s["rollout_logprobs"]) == len(s["trainer_logprobs"]) == len(s["entropy"]) > 0
        # 2 optimizer steps per step (batch 8 / mini-batch 4): the weights the step started with.
        assert s["version"] == s["engine_version"] == 2 * (s["step"] - 1)
        # Every token records the weights that sampled it: the engine's version follows each sync.
        assert s["token_versions"] == [s["engine_version"]] * n
        assert s["group"] == 0 and s["index"] in range(4)
        # Same weights, float32 on CPU: the trainer's logprobs equal the engine's up to rounding.
        assert max(abs(a - b) for a, b in zip(s["rollout_logprobs"], s["trainer_logprobs"])) < 1e-3
        assert all(0 <= h <= math.log(200) for h in s["entropy"])
        assert s["prompt"].startswith("What is") and isinstance(s["reward"], float)
    # Group-relative advantages of one group sum to zero.
    for step in (1, 2, 3):
        assert abs(sum(s["advantage"] for s in samples if s["step"] == step)) < 1e-4

    # A synchronous run that syncs every step logs its staleness (0) and the off-policy metrics.
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if "reward/mean" in record:
            assert record["off_policy/staleness_mean"] == record["off_policy/staleness_max"] == 0.0
            assert record["off_policy/staleness_hist/0"] == 1.0
            assert 0 <= record["off_policy/mismatch_kl"] < 1e-4 and record["off_policy/masked_fraction"] == 0.0

    validation = read_jsonl(run_dir / "validation_samples.jsonl")
    assert sorted({v["step"] for v in validation}) == [0, 2, 3]
    assert all(sum(v["step"] == step for v in validation) == 4 for step in (0, 2, 3))
    metrics = {(r["step"]): r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/reward_mean" in r}
    for step in (0, 2, 3):
        rewards = [v["reward"] for v in validation if v["step"] == step]
        assert sum(rewards) / len(rewards) == pytest.approx(metrics[step]["val/reward_mean"], abs=1e-5)


def test_train_log_holds_the_console_lines(run_dir):
    log = (run_dir / "train.log").read_text()
    for step in range(1, MAX_STEPS + 1):
        assert re.search(rf"step {step}/{MAX_STEPS} \| reward ", log), step
    assert "validation at step 2 (4 prompts, greedy)" in log
    assert "val/reward_mean=" in log and "[val] Q: What is" in log
    assert "saved checkpoint" in log and "Run folder:" in log


def test_report_has_an_image_per_plot_with_the_logged_values(run_dir, tmp_path):
    assert main(["report", str(run_dir), "--output", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'<figure id="plot-([a-z_]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    names = [name for name, _ in images]
    for expected in ("reward", "kl", "entropy", "response_length", "clip_fraction", "grad_norm", "timing", "sync",
                     "staleness", "logprob_mismatch", "lr"):
        assert expected in names, expected
    assert "moe_expert_load" not in names and "preference_margin" not in names  # not logged: no plot
    for name, data in images:  # the inline image is the PNG written beside the page
        assert base64.b64decode(data) == (tmp_path / "out" / f"{name}.png").read_bytes()
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == sorted(names)

    # Every line drawn is exactly a metric's logged (step, value) series.
    records = read_jsonl(run_dir / "metrics.jsonl")
    plots = {plot.panel.name: plot for plot in make_plots([load_run(run_dir)])}
    checked = 0
    for plot in plots.values():
        for line in plot.figure.axes[0].get_lines():
            key = line.get_label()
            logged = [(r["step"], r[key]) for r in records if key in r]
            assert [(int(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())] == logged, key
            checked += 1
    assert checked >= 15
    reward_lines = {line.get_label() for line in plots["reward"].figure.axes[0].get_lines()}
    assert {"reward/mean", "val/reward_mean"} <= reward_lines
    assert [line.get_label() for line in plots["timing"].figure.axes[0].get_lines()] == ["time/step"]


class _TextOf(HTMLParser):
    """The text inside elements of a class, one string per element (nested tags included)."""

    def __init__(self, css_class: str) -> None:
        super().__init__()
        self.css_class, self.depth, self.texts = css_class, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif ("class", self.css_class) in attrs:
            self.depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def test_report_sample_views_hold_the_logged_completions(run_dir):
    run = load_run(run_dir)
    page = report_page([run], [])
    # Rollout samples of the first and the last step, every token in a span with its values.
    completions = _TextOf("completion")
    completions.feed(page)
    shown = [s for s in run.samples if s["step"] in (1, 3)]
    assert len(completions.texts) == len(shown) == 8
    for text, sample in zip(completions.texts, shown):
        assert text.endswith("".join(visible(t) for t in sample["tokens"]))
    first = shown[0]
    diff = abs(first["rollout_logprobs"][0] - first["trainer_logprobs"][0])
    assert (f'title="rollout {first["rollout_logprobs"][0]:.4f} · trainer {first["trainer_logprobs"][0]:.4f} · '
            f'|Δ| {diff:.1e} · entropy {first["entropy"][0]:.3f}"') in page
    assert ' class="e9" title=' in page  # entropy past the scale: the strongest level
    # Validation: best and worst of each validation step; the last step is open.
    assert page.count("<details open><summary>step 3: 4 prompts") == 1
    for step in (0, 2):
        assert f"<summary>step {step}: 4 prompts" in page
    best = max((v for v in run.validation if v["step"] == 3), key=lambda v: v["reward"])
    assert _html_text(visible(best["completion"])) in page

    view = token_view_page(run, 2, "entropy")
    assert 'id="view-entropy" class="mode-e" checked' in view
    step, groups = samples_at_step(run.samples, 2)
    assert step == 2 and all(_html_text(visible(t.text)) in view for t in sample_tokens(groups[0][0]))


def test_view_in_the_terminal_plain_and_coloured(run_dir, capsys):
    assert main(["view", str(run_dir), "--step", "2"]) == 0
    out = capsys.readouterr().out  # not a terminal: plain text
    assert "step 2 · policy version 2 · 4 samples in 1 groups" in out and "\x1b[" not in out
    for sample in (s for s in load_run(run_dir).samples if s["step"] == 2):
        assert "".join(visible(t) for t in sample["tokens"]).split("\n")[0] in out
        assert f"reward {sample['reward']:.3g} · adv {sample['advantage']:+.3f}" in out

    samples = load_run(run_dir).samples
    coloured = render_samples(samples, None, "entropy", ansi=True)
    assert coloured.startswith("\x1b[1mstep 3\x1b[0m")
    # The tiny random model's entropy (about ln(104) = 4.6 nats) is past the top of the scale.
    assert "\x1b[48;5;27m" in coloured

    assert main(["view", str(run_dir), "--step", "7"]) == 1
    assert "no samples at step 7; samples were written at steps 1, 2, 3" in capsys.readouterr().err


def test_view_html_file(run_dir, tmp_path, capsys):
    out = tmp_path / "view.html"
    assert main(["view", str(run_dir), "--html", str(out)]) == 0
    page = out.read_text()
    assert "step 3 · policy version 4" in page and page.count('class="completion"') == 4


def test_several_runs_are_overlaid(run_dir, tmp_path):
    other = tmp_path / run_dir.name  # the same folder name: runs are told apart by their parents
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    records = read_jsonl(other / "metrics.jsonl")
    for r in records:
        if "reward/mean" in r:
            r["reward/mean"] += 1.0
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = load_runs([run_dir, other])
    assert runs[0].name != runs[1].name and runs[1].name == f"{tmp_path.name}/{run_dir.name}"
    plots = make_plots(runs)
    reward = next(p for p in plots if p.panel.name == "reward")
    lines = {line.get_label(): line for line in reward.figure.axes[0].get_lines()}
    a, b = lines[f"{runs[0].name} · reward/mean"], lines[f"{runs[1].name} · reward/mean"]
    assert list(b.get_ydata()) == pytest.approx([y + 1.0 for y in a.get_ydata()])
    assert a.get_color() != b.get_color()
    page = write_report(runs, plots, tmp_path / "compare").read_text()
    assert page.count("<img ") == len(plots) and page.count('class="completion"') == 16  # 8 per run


def test_overview_renders_to_a_png_with_a_picture(run_dir):
    """Screenshot-free render test: the PNG decodes, has the figure's size, and is not blank."""
    import matplotlib.image

    figure = overview_figure([load_run(run_dir)])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=50)
    pixels = matplotlib.image.imread(io.BytesIO(buffer.getvalue()), format="png")
    width, height = figure.get_size_inches() * 50
    assert pixels.shape[:2] == (round(height), round(width))
    assert [ax.get_title() for ax in figure.axes] == ["Reward", "KL divergence", "Policy entropy", "Response length",
                                                     "Time per step", "Loss"]  # no accuracy metric in this run
    rgb = pixels[..., :3].reshape(-1, 3)
    assert (rgb < 0.9).any(axis=1).mean() > 0.02  # lines, text, bands: not a white page
    blue = (abs(rgb - [0.12, 0.47, 0.71]) < 0.08).all(axis=1)  # tab10's first colour: the reward line
    assert blue.sum() > 20


def test_metric_series_and_panel_keys():
    records = [
        {"step": 2, "a": 1.0, "moe/layer0/load": 0.5, "note": "text"},
        {"step": 1, "a": None, "off_policy/staleness_mean": 1.0},
        {"step": 2, "a": 3.0},  # the same step again: the last value wins
        {"step": 3, "b": 2, "moe/route_agreement": 0.9},
    ]
    steps, values = metric_series(records, "a")
    assert steps == [1, 2] and math.isnan(values[0]) and values[1] == 3.0
    assert metric_series(records, "note") == ([], [])  # strings are not plotted
    run = Run(Path("."), "r", records)
    by_name = {p.name: p for p in PANELS}
    assert panel_keys(by_name["moe_expert_load"], [run]) == ["moe/layer0/load", "moe/route_agreement"]
    assert panel_keys(by_name["moe_route_agreement"], [run]) == ["moe/route_agreement"]  # R3's own panel too
    assert panel_keys(by_name["staleness"], [run]) == ["off_policy/staleness_mean"]
    assert panel_keys(by_name["reward"], [run]) == []


def test_clear_errors_without_matplotlib_or_run_folder(tmp_path, monkeypatch, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "is not a run folder (it does not exist)" in err and "metrics.jsonl" in err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[report\]'"):
        require_matplotlib()


def _html_text(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _with_stdout_closed(args: list[str]) -> subprocess.CompletedProcess:
    """``posttrain ARGS | head`` where head has already stopped reading: the pipe's reader is
    closed before the command writes a line."""
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


@pytest.mark.parametrize("args", [["view"], ["view", "--step", "2"]])
def test_view_into_a_closed_pipe_exits_0_quietly(run_dir, args):
    result = _with_stdout_closed([args[0], str(run_dir), *args[1:]])
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_print_config_into_a_closed_pipe_exits_0_quietly():
    result = _with_stdout_closed(["grpo", "--print-config"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
