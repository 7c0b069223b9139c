"""Command line: ``posttrain {grpo,ppo,sft,dpo} [--config FILE] [--print-config] [--resume [PATH]] [key=value ...]``,
``posttrain merge`` and ``posttrain serve``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from posttrain import __version__
from posttrain.config.loader import config_to_yaml, load_config
from posttrain.config.reference import format_options_help
from posttrain.config.commands import SCHEMAS
from posttrain.errors import ConfigError, PosttrainError

EXAMPLES = {"grpo": """\
examples:
  posttrain grpo                                   # SmolLM2-135M-Instruct on the embedded arithmetic task
  posttrain grpo --config cpu_quick                # small settings for a CPU
  posttrain grpo trainer.lr=5e-6 rollout.group_size=16 trainer.max_steps=200
  posttrain grpo --config gsm8k data.train_path=gsm8k/train.jsonl data.validation_path=gsm8k/test.jsonl
  posttrain grpo data.task=prompts data.train_path=my.jsonl env.cls=my_pkg.envs.MyEnv
  posttrain grpo --resume runs/grpo-20261123-101500  # continue from its latest checkpoint
  posttrain grpo --print-config trainer.lr=1e-6     # show the resolved config and exit
""", "sft": """\
examples:
  posttrain sft data.train_path=chats.jsonl        # rows {"messages": [...]} or {"prompt": ..., "completion": ...}
  posttrain sft --config sft_chat data.train_path=chats.jsonl data.validation_path=val.jsonl
  posttrain sft data.train_path=hf:HuggingFaceH4/no_robots data.split=train trainer.num_epochs=2
  posttrain sft data.train_path=chats.jsonl trainer.batch_tokens=32768 data.max_seq_len=4096
  posttrain sft --resume runs/sft-20261123-101500 data.train_path=chats.jsonl  # continue from its latest checkpoint
""", "dpo": """\
examples:
  posttrain dpo data.train_path=pairs.jsonl        # rows {"prompt": ..., "chosen": ..., "rejected": ...}
  posttrain dpo --config dpo data.train_path=pairs.jsonl data.validation_path=val.jsonl
  posttrain dpo data.train_path=hf:HuggingFaceH4/ultrafeedback_binarized data.split=train_prefs
  posttrain dpo data.train_path=pairs.jsonl algorithm.loss_type=ipo algorithm.beta=0.5
  posttrain dpo --resume runs/dpo-20261123-101500  # continue from its latest checkpoint
""", "ppo": """\
examples:
  posttrain ppo                                    # SmolLM2-135M-Instruct + a critic on the arithmetic task
  posttrain ppo --config ppo                       # the PPO preset (KL-shaped rewards, critic warm-up)
  posttrain ppo critic.lr=2e-5 critic.warmup_steps=5 algorithm.kl_coef=0.02
  posttrain ppo critic.path=HuggingFaceTB/SmolLM2-360M-Instruct  # a larger critic than the policy
  posttrain ppo --resume runs/ppo-20261123-101500  # continue from its latest checkpoint
"""}


# Command -> (one-line help, description, trainer entry point as "module:function"). A trainer
# takes (config, resume_from) and returns its run folder; its schema is SCHEMAS[command].
COMMANDS: dict[str, tuple[str, str, str]] = {
    "grpo": (
        "train a policy with GRPO",
        "Train a causal LM with GRPO (group-relative policy optimisation).",
        "posttrain.trainer.grpo:train",
    ),
    "sft": (
        "supervised fine-tuning on conversations",
        "Fine-tune a causal LM on chat conversations or prompt/completion pairs (loss on the answers only).",
        "posttrain.trainer.sft:train",
    ),
    "dpo": (
        "train a policy with DPO on preference pairs",
        "Train a causal LM with Direct Preference Optimization on (prompt, chosen, rejected) pairs.",
        "posttrain.trainer.dpo:train",
    ),
    "ppo": (
        "train a policy with PPO and a learned critic",
        "Train a causal LM with PPO: a value model (critic) and GAE advantages, rewards shaped with a per-token KL.",
        "posttrain.trainer.ppo:train",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", description="Reinforcement-learning post-training of language models."
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (short_help, description, _) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=short_help,
            description=description + " Settings come from the defaults below, then --config, then "
            "key=value overrides.",
            epilog=(EXAMPLES.get(name, "") + "\n" + format_options_help(SCHEMAS[name])).lstrip("\n"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. trainer.lr=1e-6")
        sub.add_argument("--config", "-c", metavar="FILE", help="YAML config file or preset name (see posttrain/config/presets)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        sub.add_argument(
            "--resume", nargs="?", const="", default=None, metavar="PATH",
            help="continue from a checkpoint or run folder (no PATH: the latest checkpoint in trainer.output_dir)",
        )
    _add_merge_parser(commands)
    _add_serve_parser(commands)
    return parser


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    """``posttrain merge``: not a trainer, so it is not in COMMANDS."""
    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter checkpoint into its base model",
        description="Fold a LoRA adapter checkpoint (runs/NAME/checkpoints/adapter_step_N) into its base model "
        "and save a full Hugging Face model folder (weights + tokenizer) that AutoModelForCausalLM loads.",
        epilog="examples:\n  posttrain merge runs/grpo-20261123-101500/checkpoints/adapter_step_000050 --output merged/\n"
        "  posttrain merge ADAPTER_CHECKPOINT --output merged/ --model-path HuggingFaceTB/SmolLM2-360M-Instruct\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("checkpoint", metavar="ADAPTER_CHECKPOINT", help="an adapter_step_N checkpoint folder")
    merge.add_argument("--output", "-o", required=True, metavar="DIR", help="new folder for the merged model")
    merge.add_argument(
        "--model-path", default=None, metavar="PATH",
        help="base model (hub id, folder, .gguf, 'embedded'); default: model.path of the run's config.yaml "
        "(the run folder is the checkpoint's parent's parent)",
    )
    merge.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """``posttrain serve``: not a trainer, so it is not in COMMANDS."""
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a model and serve /v1/chat/completions, /v1/completions, /v1/models, /generate "
        "(token ids in and out, for RL clients) and /health. Needs the serve extra: pip install "
        "'posttrain[serve]'. See docs/server.md.",
        epilog="examples:\n  posttrain serve                                  # the embedded SmolLM2 on 127.0.0.1:8000\n"
        "  posttrain serve --model runs/grpo-20261123-101500/checkpoints/step_000050 --port 8001\n"
        "  posttrain serve --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda --max-queue 16\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--model", default="embedded", metavar="PATH",
                       help="hub id, model folder, .gguf file or 'embedded' (default: embedded)")
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="model name reported by /v1/models (default: --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="compute dtype (default: auto, bfloat16 on GPU and float32 on CPU)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait for the engine; more get 429 (default: 64)")
    serve.add_argument("--max-prompt-tokens", type=int, default=0,
                       help="longer prompts get 400 (default: the model's max_position_embeddings)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="larger request bodies get 413 (default: 1 MiB)")
    serve.add_argument("--max-n", type=int, default=64, help="largest n (completions per prompt) (default: 64)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens (default: 4096)")
    serve.add_argument("--default-max-tokens", type=int, default=256,
                       help="max_tokens when a request gives none (default: 256)")


def _serve(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.server.cli import serve  # fastapi/uvicorn only now

    return serve(args)


def _merge(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.models.lora import merge_adapter_checkpoint  # heavy imports only now

    try:
        output = merge_adapter_checkpoint(args.checkpoint, args.output, model_path=args.model_path, device=args.device)
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 1
    print(f"merged: {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args, so overrides may also follow an option: `grpo a=1 --config x b=2`.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "merge":
        return _merge(args)
    if args.command == "serve":
        return _serve(args)
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
    module_name, function_name = COMMANDS[args.command][2].split(":")
    train = getattr(importlib.import_module(module_name), function_name)  # heavy imports only now

    try:
        output_dir = train(cfg, resume_from=resume)
    except ConfigError as exc:
        print(f"posttrain: config error: {exc}", file=sys.stderr)
        return 2
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The trainer has said which step it checkpointed (none when interrupted during set-up).
        print("posttrain: interrupted.", file=sys.stderr)
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
