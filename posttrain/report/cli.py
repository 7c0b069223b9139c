"""``posttrain report`` and ``posttrain view`` (parsers in posttrain/cli.py). Errors are
PosttrainErrors, which the CLI prints as one line."""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.errors import EXIT_OK, PosttrainError
from posttrain.logging.samples import SAMPLES_FILE
from posttrain.report import build_report
from posttrain.report.html import token_view_page
from posttrain.report.runs import load_run
from posttrain.report.terminal import print_samples


def report(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else (
        Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else Path("report"))
    path = build_report(args.run_dirs, output)
    print(f"report: {path}")
    return EXIT_OK


def view(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    if not run.samples:
        every = run.config.get("logging", {}).get("samples_every", "?") if isinstance(run.config.get("logging"), dict) else "?"
        raise PosttrainError(
            f"'{args.run_dir}' has no rollout samples ({SAMPLES_FILE}): grpo and ppo runs write them at step 1 and "
            f"every logging.samples_every steps (this run: {every}; 0 is off); sft and dpo runs write none."
        )
    try:
        if args.html:
            Path(args.html).write_text(token_view_page(run, args.step, args.color), encoding="utf-8")
            print(f"samples: {args.html}")
        else:
            print_samples(run.samples, args.step, args.color)
    except ValueError as exc:  # no samples at --step: the message names the steps there are
        raise PosttrainError(f"{args.run_dir}: {exc}; pass one of them with --step.") from exc
    return EXIT_OK
