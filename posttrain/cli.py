"""Command line: ``posttrain grpo [--config FILE] [--print-config] [--resume [PATH]] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from posttrain import __version__
from posttrain.config.loader import config_to_yaml, load_config
from posttrain.config.reference import format_options_help
from posttrain.config.schema import SCHEMAS
from posttrain.errors import ConfigError, PosttrainError

EXAMPLES = """\
examples:
  posttrain grpo                                   # SmolLM2-135M-Instruct on the embedded arithmetic task
  posttrain grpo --config cpu_quick                # small settings for a CPU
  posttrain grpo trainer.lr=5e-6 rollout.group_size=16 trainer.max_steps=200
  posttrain grpo --config gsm8k data.train_path=gsm8k/train.jsonl data.validation_path=gsm8k/test.jsonl
  posttrain grpo data.task=prompts data.train_path=my.jsonl env.cls=my_pkg.envs.MyEnv
  posttrain grpo --resume runs/grpo-20261123-101500  # continue from its latest checkpoint
  posttrain grpo --print-config trainer.lr=1e-6     # show the resolved config and exit
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", description="Reinforcement-learning post-training of language models."
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    grpo = commands.add_parser(
        "grpo",
        help="train a policy with GRPO",
        description="Train a causal LM with GRPO (group-relative policy optimisation). Settings come "
        "from the defaults below, then --config, then key=value overrides.",
        epilog=EXAMPLES + "\noptions (set as key=value):\n" + format_options_help(SCHEMAS["grpo"]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grpo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. trainer.lr=1e-6")
    grpo.add_argument("--config", "-c", metavar="FILE", help="YAML config file or preset name (gsm8k, cpu_quick)")
    grpo.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    grpo.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="PATH",
        help="continue from a checkpoint or run folder (no PATH: the latest checkpoint in trainer.output_dir)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        cfg = load_config(SCHEMAS[args.command], args.config, args.overrides)
        resume = args.resume
        if resume == "":
            if not cfg.trainer.output_dir:
                raise ConfigError("--resume without a PATH needs trainer.output_dir=<run folder> to find the latest checkpoint.")
            resume = cfg.trainer.output_dir
    except ConfigError as exc:
        print(f"posttrain: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    _setup_console_logging()
    from posttrain.trainer.grpo import train  # heavy imports only when training

    try:
        output_dir = train(cfg, resume_from=resume)
    except ConfigError as exc:
        print(f"posttrain: config error: {exc}", file=sys.stderr)
        return 2
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("posttrain: interrupted; the last completed step is checkpointed.", file=sys.stderr)
        return 130
    print(f"done: {output_dir}")
    return 0


def _setup_console_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("posttrain").setLevel(logging.INFO)
    # transformers' per-call notices (e.g. about generation flags) would drown the progress bar.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
