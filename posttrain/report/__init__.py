"""posttrain.report: look at runs. ``posttrain report`` writes one self-contained HTML page with
plots over steps (several runs overlaid), best and worst validation samples and the token view
of rollout samples; ``posttrain view`` shows the rollout samples of a step in the terminal.
See docs/report.md."""

from __future__ import annotations

from pathlib import Path

from posttrain.report.html import write_report
from posttrain.report.plots import make_plots, require_matplotlib
from posttrain.report.runs import PANELS, Run, load_run, load_runs, metric_series, panel_keys


def build_report(run_dirs: list[str | Path], output_dir: str | Path) -> Path:
    """Write ``output_dir``/report.html and a PNG per plot; returns the HTML's path."""
    require_matplotlib()  # before reading anything: the error should come first
    runs = load_runs(list(run_dirs))
    return write_report(runs, make_plots(runs), Path(output_dir))


__all__ = ["PANELS", "Run", "build_report", "load_run", "load_runs", "metric_series", "panel_keys"]
