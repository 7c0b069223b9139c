"""Reading run folders: metrics.jsonl, samples.jsonl, validation_samples.jsonl, config.yaml.

Pure data, no plotting: ``load_run`` gives a :class:`Run`, ``metric_series`` the (steps, values)
of one metric, ``PANELS`` the plots of a report and ``panel_keys`` the metrics of a panel that a
set of runs logged (a panel with none is skipped, so SFT, DPO, GRPO and PPO runs all get the
plots that apply to them).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from posttrain.errors import PosttrainError
from posttrain.logging.metrics import METRICS_FILE
from posttrain.logging.run_files import read_step_records, warn_skipped_lines
from posttrain.logging.samples import SAMPLES_FILE, VALIDATION_SAMPLES_FILE


@dataclass(frozen=True)
class Panel:
    """One plot: the metrics it draws (exact names or ``fnmatch`` patterns such as ``moe/*``),
    in legend order. ``stacked``: the last key is a total and the others its parts, drawn (for a
    single run) as stacked bands under the total's line: the timing breakdown."""

    name: str  # file name of the PNG
    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    stacked: bool = False
    log_y: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward", ("reward/mean", "val/reward_mean", "val/*/reward_mean", "rewards/chosen",
                               "rewards/rejected"), "mean reward"),
    Panel("accuracy", "Accuracy", ("reward/accuracy", "val/accuracy", "val/accuracy_level_*", "rewards/accuracy",
                                   "val/rewards/accuracy"), "fraction correct"),
    Panel("kl", "KL divergence", ("kl", "actor/approx_kl"), "nats / token"),
    Panel("entropy", "Policy entropy", ("entropy",), "nats / token"),
    Panel("response_length", "Response length", ("response/length_mean", "response/length_max",
                                                 "val/response_length_mean"), "tokens"),
    Panel("truncation", "Truncated responses", ("response/truncated_fraction", "val/truncated_fraction",
                                                "response/masked_fraction"), "fraction"),
    Panel("clip_fraction", "Clip fraction", ("actor/clip_fraction", "actor/dual_clip_fraction",
                                             "critic/clip_fraction"), "fraction of tokens"),
    Panel("grad_norm", "Gradient norm (before clipping)", ("grad_norm", "critic/grad_norm"), "L2 norm", log_y=True),
    Panel("loss", "Loss", ("loss/policy", "loss", "val/loss", "critic/value_loss"), "loss"),
    Panel("preference_margin", "Preference margin", ("rewards/margins", "val/rewards/margins"), "chosen - rejected"),
    # time/score: scoring, reference and old logprobs, advantages. Weight sync comes after
    # time/step's end (its own panel).
    Panel("timing", "Time per step", ("time/generate", "time/score", "time/train", "time/step"), "seconds",
          stacked=True),
    # rollout.mode=async: generation overlaps the step, which waits for it (time/wait_rollouts) instead.
    Panel("async_timing", "Trainer time per step (async)", ("time/wait_rollouts", "time/prepare", "time/train"),
          "seconds", stacked=True),
    Panel("throughput", "Throughput", ("perf/tokens_per_s", "perf/gen_tokens_per_s"), "tokens / s"),
    Panel("sync", "Weight sync", ("sync/seconds",), "seconds"),
    Panel("staleness", "Staleness", ("sync/staleness", "api/staleness_mean", "off_policy/staleness*"),
          "policy versions behind"),
    Panel("logprob_mismatch", "Engine vs trainer logprobs", ("rollout/logprob_mismatch_mean",
                                                             "rollout/logprob_mismatch_max",
                                                             "actor/rollout_logprob_diff"), "|logprob difference|",
          log_y=True),
    # algorithm.off_policy_correction: how far the engine's samples are from the trainer's policy
    # (ratio pi_old / pi_engine per token, k3 KL) and what the correction masked. Every GRPO/PPO run
    # logs them (ratio 1 where the engine's logprobs are the old ones). See docs/off_policy.md.
    Panel("off_policy_ratio", "Off-policy: importance ratio trainer / engine", (
        "off_policy/is_ratio_p05", "off_policy/is_ratio_p50", "off_policy/is_ratio_p95", "off_policy/is_ratio_max"),
        "pi_old / pi_engine per token", log_y=True),
    Panel("off_policy", "Off-policy: mismatch and masking", (
        "off_policy/mismatch_kl", "off_policy/masked_fraction", "off_policy/masked_seq_fraction",
        "off_policy/dropped_seq_fraction"), "k3 KL (nats / token); fraction"),
    Panel("moe_expert_load", "MoE expert load", ("moe/*",), "load"),
    # Router replay (R3): how often the trainer's own top-k experts equal the engine's (1: no drift).
    Panel("moe_route_agreement", "MoE: trainer routes vs engine routes", ("moe/route_agreement",),
          "fraction of tokens"),
    Panel("lr", "Learning rate", ("lr", "critic/lr"), "lr"),
)


@dataclass
class Run:
    """What a run folder holds; files a run did not write are empty lists / dicts."""

    path: Path
    name: str
    records: list[dict] = field(default_factory=list)  # metrics.jsonl, in file order
    samples: list[dict] = field(default_factory=list)  # samples.jsonl
    validation: list[dict] = field(default_factory=list)  # validation_samples.jsonl
    config: dict = field(default_factory=dict)  # config.yaml

    def keys(self) -> list[str]:
        """Every numeric metric logged, sorted."""
        return sorted({k for r in self.records for k, v in r.items()
                       if k not in ("step", "timestamp") and (v is None or _is_number(v))})

    def sample_steps(self) -> list[int]:
        return sorted({int(s["step"]) for s in self.samples})

    def validation_steps(self) -> list[int]:
        return sorted({int(s["step"]) for s in self.validation})


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run folder; it must hold metrics.jsonl (the one file every trainer writes)."""
    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        hint = " (it does not exist)" if not path.exists() else ""
        raise PosttrainError(
            f"'{path}' is not a run folder{hint}: it has no {METRICS_FILE}. Pass the folder a training run "
            "wrote (trainer.output_dir, by default runs/<command>-<date>-<time>)."
        )
    config: dict = {}
    if (path / "config.yaml").is_file():
        try:
            config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        except Exception:  # a hand-edited, broken config.yaml: the plots do not need it
            config = {}
    return Run(
        path=path, name=name or path.resolve().name, records=read_jsonl(path / METRICS_FILE),
        samples=read_jsonl(path / SAMPLES_FILE), validation=read_jsonl(path / VALIDATION_SAMPLES_FILE),
        config=config if isinstance(config, dict) else {},
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Several runs, named by folder; folders of the same name get their parent's name too."""
    paths = [Path(p) for p in paths]
    names = [p.resolve().name for p in paths]
    return [load_run(p, f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n) for p, n in zip(paths, names)]


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSONL file with an integer step; a missing file is empty. A damaged line is
    skipped with a warning naming the file and line (the report shows what could be read), and a
    last line cut off by a crash is skipped quietly. Reads both strict JSON (null) and Python's
    NaN / Infinity."""
    records, problems = read_step_records(path)
    warn_skipped_lines(path, problems, logging.getLogger("posttrain.report"), "shown without them")
    return records


def metric_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; the last value wins when a step repeats, and
    null (a non-finite value in strict JSON) is NaN, which leaves a gap in the line."""
    by_step: dict[int, float] = {}
    for record in records:
        if key in record:
            value = record[key]
            if value is None or _is_number(value):
                by_step[int(record["step"])] = math.nan if value is None else float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def panel_keys(panel: Panel, runs: list[Run]) -> list[str]:
    """The metrics of ``panel`` that any of ``runs`` logged, in the panel's order (a pattern's
    matches sorted)."""
    logged = sorted({k for run in runs for k in run.keys()})
    out: list[str] = []
    for pattern in panel.keys:
        matches = [k for k in logged if fnmatch.fnmatchcase(k, pattern)] if any(c in pattern for c in "*?[") else (
            [pattern] if pattern in logged else [])
        out += [k for k in matches if k not in out]
    return out


def final_values(run: Run) -> dict[str, float]:
    """The last value of every numeric metric (NaN when the last one was non-finite)."""
    return {key: metric_series(run.records, key)[1][-1] for key in run.keys()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
