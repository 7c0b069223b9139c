"""The report page and the token view, as self-contained HTML (images inline as base64 PNGs,
CSS inline, no JavaScript: it opens from disk, in a mail, or as a CI artifact).

The colour mode of the token view switches with two radio buttons and CSS alone: each token
carries a class per mode for its colour level (``m1``..``m9`` mismatch, ``e1``..``e9``
entropy; none for level 0), and the checked radio decides which one sets its background. Classes
rather than inline colours keep a token to about 60 bytes of markup.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from posttrain.report.plots import Plot
from posttrain.report.runs import Run, final_values
from posttrain.report.tokens import legend, sample_tokens, samples_at_step, summary, visible

_MISMATCH_RGB, _ENTROPY_RGB = (220, 38, 38), (37, 99, 235)
_LEVELS = 9  # colour steps per mode
_BEST_WORST = 3  # validation samples shown per end

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
 padding:0 16px;color:#1f2328}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:6px}figure img{width:100%;height:auto}
figcaption{font-size:12px;color:#57606a}
.group{border:1px solid #d0d7de;border-radius:6px;margin:10px 0;padding:8px}
.prompt{font-weight:600;margin-bottom:6px;white-space:pre-wrap}
.completions{display:grid;gap:8px}
.completion{border-left:3px solid #d0d7de;padding-left:6px;min-width:0}
.meta{font-size:12px;color:#57606a;margin-bottom:3px}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12.5px/1.5 ui-monospace,SFMono-Regular,Menlo,monospace}
.tokenview span{border-radius:2px}.obs{color:#8c959f;font-style:italic}
.legend{font-size:12px;color:#57606a}
details{margin:6px 0}summary{cursor:pointer}
.val{display:grid;grid-template-columns:1fr 1fr;gap:10px}.val pre{background:#f6f8fa;padding:4px;border-radius:4px}
"""


def report_page(runs: list[Run], plots: list[Plot]) -> str:
    """The whole report: runs, plots, last values, validation samples, rollout samples."""
    title = "posttrain report: " + ", ".join(run.name for run in runs)
    body = [f"<h1>{_e(title)}</h1>", _runs_table(runs)]
    body.append('<h2 id="metrics">Metrics</h2>')
    if plots:
        body.append('<div class="plots">' + "".join(_figure(plot) for plot in plots) + "</div>")
    else:
        body.append("<p>No metrics logged yet.</p>")
    body.append('<h2 id="last-values">Last values</h2>' + _final_table(runs))
    if any(run.validation for run in runs):
        body.append('<h2 id="validation">Validation samples: best and worst</h2>')
        body += [_validation_section(run) for run in runs if run.validation]
    if any(run.samples for run in runs):
        body.append('<h2 id="samples">Rollout samples</h2>')
        for number, run in enumerate(runs):
            if run.samples:
                steps = run.sample_steps()
                shown = sorted({steps[0], steps[-1]})  # the start and the latest: how the policy moved
                body.append(f"<h3>{_e(run.name)}</h3><p class=legend>Samples at steps {_e(_steps_text(steps))}; "
                            f"shown: {', '.join(map(str, shown))}. All of them: <code>posttrain view {_e(str(run.path))} "
                            "--step N</code>.</p>")
                body.append(token_view(run.samples, shown, f"run{number}"))
    return _page(title, "\n".join(body))


def _level_css() -> str:
    """The background of each colour level, for the mode whose radio button is checked."""
    rules = []
    for mode, rgb in (("m", _MISMATCH_RGB), ("e", _ENTROPY_RGB)):
        for level in range(1, _LEVELS + 1):
            alpha = 0.12 + 0.78 * level / _LEVELS
            text = ";color:#fff" if level > _LEVELS * 2 // 3 else ""  # dark text on a strong colour is unreadable
            rules.append(f".mode-{mode}:checked~.tokenview .{mode}{level}"
                         f"{{background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f}){text}}}")
    return "\n".join(rules)


def token_view_page(run: Run, step: int | None, mode: str = "mismatch") -> str:
    """A page with the token view of one step of ``run`` (None: its last step with samples)."""
    step, _ = samples_at_step(run.samples, step)
    title = f"posttrain samples: {run.name}, step {step}"
    return _page(title, f"<h1>{_e(title)}</h1>" + token_view(run.samples, [step], "view", mode))


def token_view(samples: list[dict], steps: list[int], view_id: str, mode: str | None = None) -> str:
    """The samples of ``steps``: a box per GRPO group with its completions side by side, tokens
    coloured by mismatch or entropy (radio buttons; ``mode`` the initial one, default mismatch
    when trainer logprobs were recorded)."""
    if mode is None:
        mode = "mismatch" if any(s.get("trainer_logprobs") for s in samples) else "entropy"
    radios = "".join(
        f'<input type="radio" name="{view_id}-mode" id="{view_id}-{m}" class="mode-{m[0]}"'
        f'{" checked" if m == mode else ""}><label for="{view_id}-{m}">{m}</label> '
        for m in ("mismatch", "entropy")
    )
    legends = f'<div class="legend">{_e(legend("mismatch"))}; {_e(legend("entropy"))}. Hover a token for its values.</div>'
    parts = []
    for step in steps:
        step, groups = samples_at_step(samples, step)
        first = groups[0][0]
        engine = first.get("engine_version")
        versions = f"policy version {first.get('version', '?')}" + (
            f", engine version {engine}" if engine is not None and engine != first.get("version") else "")
        parts.append(f"<h3>step {step} · {_e(versions)}</h3>")
        parts += [_group(group) for group in groups]
    return f'<div class="samples">{radios}{legends}<div class="tokenview">{"".join(parts)}</div></div>'


def write_report(runs: list[Run], plots: list[Plot], output_dir: Path) -> Path:
    """report.html (self-contained) and a PNG per plot in ``output_dir``; returns the HTML's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        (output_dir / f"{plot.panel.name}.png").write_bytes(plot.png())
    path = output_dir / "report.html"
    path.write_text(report_page(runs, plots), encoding="utf-8")
    return path


def _group(group: list[dict]) -> str:
    columns = min(len(group), 4)  # wider groups wrap onto more rows
    completions = "".join(
        f'<div class="completion"><div class="meta">[{_e(str(s.get("index", "?")))}] {_e(summary(s))}</div>'
        f"<pre>{_tokens_html(s)}</pre></div>"
        for s in group
    )
    return (f'<div class="group"><div class="prompt">{_e(str(group[0].get("prompt", "")))}</div>'
            f'<div class="completions" style="grid-template-columns:repeat({columns},minmax(0,1fr))">'
            f"{completions}</div></div>")


def _tokens_html(sample: dict) -> str:
    tokens = sample_tokens(sample)
    if not tokens:
        return _e(visible(str(sample.get("completion", ""))))
    out = []
    for token in tokens:
        text = _e(visible(token.text))
        if not token.is_model_token:
            out.append(f'<span class="obs" title="{_e(token.describe())}">{text}</span>')
            continue
        classes = " ".join(f"{mode[0]}{level}" for mode in ("mismatch", "entropy")
                           if (level := _level(token.intensity(mode))))
        out.append(f'<span class="{classes}" title="{_e(token.describe())}">{text}</span>' if classes
                   else f'<span title="{_e(token.describe())}">{text}</span>')
    return "".join(out)


def _level(intensity: float) -> int:
    """0 (no colour) for intensity 0, else 1.._LEVELS."""
    return 0 if intensity <= 0 else max(1, min(_LEVELS, math.ceil(intensity * _LEVELS)))


def _validation_section(run: Run) -> str:
    steps = run.validation_steps()
    out = [f"<h3>{_e(run.name)}</h3>"]
    for step in steps:
        rows = [r for r in run.validation if int(r["step"]) == step]
        rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
        mean = sum(rewards) / len(rewards) if rewards else math.nan
        ranked = sorted(rows, key=lambda r: r.get("reward") if isinstance(r.get("reward"), (int, float)) else -math.inf,
                        reverse=True)
        best = ranked[:_BEST_WORST]
        worst = [r for r in ranked[::-1][:_BEST_WORST] if not any(r is b for b in best)]
        out.append(
            f'<details{" open" if step == steps[-1] else ""}><summary>step {step}: {len(rows)} prompts, '
            f"mean reward {mean:.3g}</summary><div class=\"val\"><div><b>best</b>{_validation_rows(best)}</div>"
            f"<div><b>worst</b>{_validation_rows(worst)}</div></div></details>"
        )
    return "".join(out)


def _validation_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        expected = f" · expected {_e(str(r['expected']))}" if r.get("expected") is not None else ""
        answer = f" · answer {_e(str(r['answer']))}" if r.get("answer") is not None else ""
        reward = r.get("reward")
        out.append(f'<div class="meta">reward {reward if not isinstance(reward, float) else f"{reward:.3g}"}'
                   f"{answer}{expected}</div><div class=prompt>{_e(visible(str(r.get('prompt', ''))))}</div>"
                   f"<pre>{_e(visible(str(r.get('completion', ''))))}</pre>")
    return "".join(out) or "<p>-</p>"


def _runs_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        steps = sorted({int(r["step"]) for r in run.records})
        model = run.config.get("model", {}).get("path", "") if isinstance(run.config.get("model"), dict) else ""
        rows.append(f"<tr><td>{_e(run.name)}</td><td><code>{_e(str(run.path))}</code></td><td>{_e(str(model))}</td>"
                    f"<td class=num>{steps[-1] if steps else '-'}</td><td class=num>{len(run.samples)}</td>"
                    f"<td class=num>{len(run.validation)}</td></tr>")
    return ("<table><tr><th>run</th><th>folder</th><th>model</th><th>last step</th><th>rollout samples</th>"
            "<th>validation samples</th></tr>" + "".join(rows) + "</table>")


def _final_table(runs: list[Run]) -> str:
    finals = [final_values(run) for run in runs]
    keys = sorted({k for f in finals for k in f})
    if not keys:
        return "<p>-</p>"
    header = "".join(f"<th>{_e(run.name)}</th>" for run in runs)
    rows = "".join(
        f"<tr><td>{_e(key)}</td>" + "".join(f"<td class=num>{_fmt(f.get(key))}</td>" for f in finals) + "</tr>"
        for key in keys
    )
    return f"<details><summary>{len(keys)} metrics</summary><table><tr><th>metric</th>{header}</tr>{rows}</table></details>"


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png()).decode("ascii")
    keys = ", ".join(plot.keys)
    return (f'<figure id="plot-{plot.panel.name}"><img alt="{_e(plot.panel.title)}: {_e(keys)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(keys)}</figcaption></figure>')


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}{_level_css()}</style></head><body>\n{body}\n</body></html>\n")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)})"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
