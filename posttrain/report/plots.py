"""The report's plots, with matplotlib's Agg canvas (no display, no pyplot global state).

One figure per :data:`~posttrain.report.runs.PANELS` entry that the runs have metrics for.
One run: a colour per metric. Several runs: a colour per run and a line style per metric, so the
runs compare at a glance. Validation metrics (``val/*``, logged every few steps) get markers.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.report.runs import PANELS, Panel, Run, metric_series, panel_keys

_LINE_STYLES = ("-", "--", ":", "-.")
_MAX_LEGEND_ENTRIES = 12  # MoE panels may draw a line per expert; a legend of 64 hides the plot
FIGURE_SIZE = (6.4, 3.4)  # inches, at DPI: 640 x 340 pixels
DPI = 100


@dataclass
class Plot:
    panel: Panel
    keys: list[str]  # the metrics drawn
    figure: Any  # matplotlib.figure.Figure
    _png: bytes = b""

    def png(self) -> bytes:
        """The figure as PNG, rendered once (the report writes it to a file and inlines it)."""
        if not self._png:
            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=DPI)
            self._png = buffer.getvalue()
        return self._png


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (optional: the report extra)
    except ImportError as exc:
        raise PosttrainError(
            "`posttrain report` and `posttrain view --html` plot with matplotlib, which is not installed: "
            f"run `pip install 'posttrain[report]'` (or `pip install matplotlib`). ({exc})"
        ) from exc


def make_plots(runs: list[Run]) -> list[Plot]:
    """A figure per panel with data in any of ``runs``, in PANELS order."""
    require_matplotlib()
    from matplotlib.figure import Figure  # optional (report extra): checked just above

    plots = []
    for panel in PANELS:
        keys = panel_keys(panel, runs)
        if not keys:
            continue
        figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
        draw_panel(figure.add_subplot(), panel, keys, runs)
        plots.append(Plot(panel, keys, figure))
    return plots


OVERVIEW_PANELS = ("reward", "accuracy", "kl", "entropy", "response_length", "timing", "loss", "grad_norm",
                   "clip_fraction")


def overview_figure(runs: list[Run], names: tuple[str, ...] = OVERVIEW_PANELS, count: int = 6,
                    columns: int = 3) -> Any:
    """The first ``count`` panels of ``names`` that have data, in one figure: a picture of a run to share."""
    require_matplotlib()
    from matplotlib.figure import Figure  # optional (report extra): checked just above

    by_name = {p.name: p for p in PANELS}
    chosen = [(by_name[n], keys) for n in names if (keys := panel_keys(by_name[n], runs))][:count]
    rows = max(1, math.ceil(len(chosen) / columns))
    figure = Figure(figsize=(4.2 * columns, 2.9 * rows), layout="constrained")
    for i, (panel, keys) in enumerate(chosen):
        draw_panel(figure.add_subplot(rows, columns, i + 1), panel, keys, runs, legend_size=6)
    return figure


def draw_panel(ax: Any, panel: Panel, keys: list[str], runs: list[Run], legend_size: float = 7.5) -> None:
    """Draw ``keys`` of ``runs`` on ``ax``. Every metric is a line whose data are exactly the
    logged (step, value) pairs (``metric_series``); the stacked timing area is drawn beneath."""
    from matplotlib import colormaps  # optional (report extra): make_plots checked it
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"].colors
    several = len(runs) > 1
    stacked = panel.stacked and not several
    total = panel.keys[-1]  # of a stacked panel: the line over the bands of the other keys
    positive = True
    for r, run in enumerate(runs):
        if stacked:
            _stack(ax, run, [key for key in keys if key != total], colours)
        for k, key in enumerate(keys):
            steps, values = metric_series(run.records, key)
            if not steps or (stacked and key != total):
                continue
            positive = positive and all(v > 0 for v in values if not math.isnan(v))
            validation = key.startswith("val/")
            ax.plot(
                steps, values,
                color="black" if stacked else colours[(r if several else k) % len(colours)],
                linestyle=_LINE_STYLES[k % len(_LINE_STYLES)] if several else ("--" if validation else "-"),
                marker="o" if validation or len(steps) == 1 else None, markersize=3.5,
                linewidth=1.4, label=f"{run.name} · {key}" if several else key,
            )
    if panel.log_y and positive:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if 0 < len(labels) <= _MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=legend_size, loc="best", framealpha=0.8)


def _stack(ax: Any, run: Run, keys: list[str], colours: tuple) -> None:
    """Bands of the parts of a total, at the steps of the first part."""
    parts = [key for key in keys if metric_series(run.records, key)[0]]
    if not parts:
        return
    steps = metric_series(run.records, parts[0])[0]
    bands = []
    for key in parts:
        by_step = dict(zip(*metric_series(run.records, key)))
        bands.append([0.0 if math.isnan(by_step.get(s, 0.0)) else by_step.get(s, 0.0) for s in steps])
    ax.stackplot(steps, *bands, labels=parts, colors=colours[: len(parts)], alpha=0.55)
