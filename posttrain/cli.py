"""Command line: ``posttrain {grpo,ppo,sft,dpo} [--config FILE] [--print-config] [--dry-run] [--resume [PATH]] [key=value ...]``,
``posttrain merge``, ``posttrain serve``, ``posttrain convert``, ``posttrain report`` and ``posttrain view``.

Each command imports what it runs inside its function: `posttrain --help`, `--print-config` and
config errors then take a fifth of a second, not the seconds that importing torch, transformers,
fastapi or matplotlib takes (and a missing optional extra fails only the command that needs it)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from posttrain import __version__
from posttrain.config.loader import config_to_yaml, load_config
from posttrain.config.reference import format_options_help
from posttrain.config.commands import SCHEMAS
from posttrain.config.encoding import check_utf8_file, check_utf8_settings, check_utf8_text
from posttrain.errors import (
    EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_TERMINATED, TRACEBACK_LIMIT, ConfigError, PosttrainError,
    Terminated, clip_text, describe_os_error, sigterm_as_interrupt,
)

EXAMPLES = {"grpo": """\
examples:
  posttrain grpo                                   # SmolLM2-135M-Instruct on the embedded arithmetic task
  posttrain grpo --config cpu_quick                # small settings for a CPU
  posttrain grpo trainer.lr=5e-6 rollout.group_size=16 trainer.max_steps=200
  posttrain grpo --config gsm8k data.train_path=gsm8k/train.jsonl data.validation_path=gsm8k/test.jsonl
  posttrain grpo data.task=prompts data.train_path=my.jsonl env.cls=my_pkg.envs.MyEnv
  posttrain grpo --resume runs/grpo-20261123-101500  # continue from its latest checkpoint
  posttrain grpo --print-config trainer.lr=1e-6     # show the resolved config and exit
  posttrain grpo --dry-run rollout.batch_size=256   # estimate memory and step time; trains and writes nothing
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


EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_RUNTIME}    runtime error (bad data, model or checkpoint files, disk full, ...): one line on stderr;
       --debug shows the traceback
  {EXIT_CONFIG}    invalid configuration or command line: nothing was started
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): trainers save a checkpoint of the last whole step first
  {EXIT_TERMINATED}  stopped by SIGTERM (kill, docker stop, Slurm, Kubernetes): as Ctrl-C; a second SIGTERM
       ends the process at once
"""


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
        prog="posttrain", description="Reinforcement-learning post-training of language models.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line (also accepted after COMMAND)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (short_help, description, _) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=short_help,
            description=description + " Settings come from the defaults below, then --config, then "
            "key=value overrides; with --resume, from the run's saved config.yaml, then --config, then the overrides.",
            epilog=(EXAMPLES.get(name, "") + "\n" + format_options_help(SCHEMAS[name])).lstrip("\n"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. trainer.lr=1e-6")
        sub.add_argument("--config", "-c", metavar="FILE", help="YAML config file or preset name (see posttrain/config/presets)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        sub.add_argument(
            "--dry-run", action="store_true",
            help="print the key settings, parameter counts, memory and KV-cache estimates, tokens per step and a "
            "step time extrapolated from a short measurement on the device, with warnings; then exit without "
            "training or writing anything (estimates are for a fresh run: with --resume, of the run's settings, "
            "not its progress)",
        )
        sub.add_argument(
            "--resume", nargs="?", const="", default=None, metavar="PATH",
            help="continue from a checkpoint or run folder (no PATH: the latest checkpoint in trainer.output_dir) "
            "with the run's saved config.yaml; --config and key=value overrides change it where given. "
            "--resume auto: the latest complete checkpoint in trainer.output_dir if it has one, else a new run "
            "there (one command line for every start of a preemptible job)",
        )
    _add_merge_parser(commands)
    _add_serve_parser(commands)
    _add_convert_parser(commands)
    _add_rollout_api_parser(commands)
    _add_report_parsers(commands)
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
        "(token ids in and out, for RL clients), /health, /metrics (Prometheus), and SGLang-compatible weight-update endpoints "
        "(/init_weights_update_group, /update_weights_from_distributed, /update_weights_from_disk, ...; "
        "see docs/weight_sync.md). Needs the serve extra: pip install "
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
                       help="longer prompts get 400 (default: --max-model-len - 1 with posttrain's engine, "
                       "else the model's max_position_embeddings)")
    engine = serve.add_argument_group("engine (see docs/server.md)")
    engine.add_argument("--engine", default="auto", choices=["auto", "posttrain", "hf"],
                        help="auto (default): posttrain's engine (continuous batching across requests) for the "
                        "Llama, Qwen2, Qwen3 and Mistral families, else transformers (one request at a time)")
    engine.add_argument("--max-num-seqs", type=int, default=256,
                        help="posttrain engine: most sequences decoding at once, over all requests (default: 256)")
    engine.add_argument("--max-model-len", type=int, default=0,
                        help="posttrain engine: longest prompt + completion in tokens "
                        "(default: the model's max_position_embeddings, at most 8192)")
    engine.add_argument("--kv-cache-memory-fraction", type=float, default=0.8,
                        help="posttrain engine on GPU: fraction of the memory free after loading the model "
                        "given to the KV cache (default: 0.8)")
    engine.add_argument("--expert-dtype", default="auto", choices=["auto", "fp8"],
                        help="posttrain engine, MoE models: 'fp8' computes the experts from e4m3 weights with "
                        "per-output-channel scales, quantized again at every weight update (NVIDIA GPU of compute "
                        "capability 8.9+; see docs/moe.md) (default: auto, the model's dtype)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="larger request bodies get 413 (default: 1 MiB)")
    serve.add_argument("--max-n", type=int, default=64, help="largest n (completions per prompt) (default: 64)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens (default: 4096)")
    serve.add_argument("--default-max-tokens", type=int, default=256,
                       help="max_tokens when a request gives none (default: 256)")
    serve.add_argument("--request-timeout-s", type=float, default=600.0,
                       help="a generation request not answered by then gets 504 and is stopped (default: 600)")
    serve.add_argument("--paused-wait-s", type=float, default=30.0,
                       help="how long a request waits while generation is paused (/pause_generation) before "
                       "503 with Retry-After (default: 30)")
    serve.add_argument("--weight-sync-timeout-s", type=float, default=120.0,
                       help="joining a trainer's weight-update group (/init_weights_update_group) gives up after "
                       "this; generation goes on meanwhile (default: 120)")
    proxy = serve.add_argument_group("prompt proxy (no model is loaded; see docs/server.md)")
    proxy.add_argument("--proxy", default="", metavar="BASE_URL",
                       help="forward to this OpenAI-compatible backend, applying --prompt-config")
    proxy.add_argument("--prompt-config", default="", metavar="NAME",
                       help="prompt template: a preset in posttrain/server/prompts (math, gsm8k, plain) or a YAML file")
    proxy.add_argument("--env", default="", metavar="NAME",
                       help="score /generate completions with this environment (a name such as math, or an import path)")
    proxy.add_argument("--dry-run", action="store_true",
                       help="call no backend: print each formatted prompt and answer with it")
    serve.add_argument("--enable-tensor-updates", action="store_true",
                       help="allow /update_weights_from_tensor, which unpickles its request (trusted trainers only)")


def _add_rollout_api_parser(commands: argparse._SubParsersAction) -> None:
    """``posttrain rollout-api``: the queue between environment processes and a trainer."""
    api = commands.add_parser(
        "rollout-api",
        help="serve the rollout API: environments submit scored groups, the trainer pulls batches",
        description="An Atropos-style rollout API: environment processes POST /register and POST /groups "
        "(scored groups of token ids); a trainer with rollout.source=api pulls batches with GET /batch. "
        "Bounded queue (429 when full), stale groups dropped and counted, a JSONL journal survives restarts. "
        "Needs the serve extra. See docs/rollout_api.md.",
        epilog="examples:\n  posttrain rollout-api --port 8100 --journal runs/rollout_api.jsonl\n"
        "  posttrain grpo rollout.source=api rollout.api_url=http://127.0.0.1:8100\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    api.add_argument("--port", type=int, default=8100, help="port to listen on (default: 8100)")
    api.add_argument("--max-queue-groups", type=int, default=256,
                     help="groups that may wait for the trainer; more submissions get 429 (default: 256)")
    api.add_argument("--max-staleness", type=int, default=1,
                     help="drop groups generated more than this many policy versions ago; -1: never (default: 1)")
    api.add_argument("--journal", default="", metavar="PATH",
                     help="JSONL file the queue is persisted to and restored from (default: none, in memory)")
    api.add_argument("--max-request-bytes", type=int, default=64 << 20,
                     help="larger request bodies get 413 (default: 64 MiB)")
    api.add_argument("--prompts", default="", metavar="FILE",
                     help="JSONL rows served at GET /prompts, shuffled per epoch (default: none)")
    api.add_argument("--seed", type=int, default=0, help="shuffle seed of --prompts (default: 0)")


def _rollout_api(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.server.rollout_api import run_rollout_api  # fastapi/uvicorn only now

    return run_rollout_api(args)


def _serve(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.server.cli import serve  # fastapi/uvicorn only now

    return serve(args)


def _merge(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.models.merge import merge_adapter_checkpoint  # heavy imports only now

    output = merge_adapter_checkpoint(args.checkpoint, args.output, model_path=args.model_path, device=args.device)
    print(f"merged: {output}")
    return EXIT_OK


def _add_convert_parser(commands: argparse._SubParsersAction) -> None:
    """``posttrain convert``: not a trainer, so it is not in COMMANDS."""
    convert = commands.add_parser(
        "convert",
        help="convert a sharded (multi-process) checkpoint to a Hugging Face model folder",
        description="Gather the shards of a checkpoint written by a multi-process run (checkpoints/step_N with a "
        "dcp/ folder) into a Hugging Face model folder (config, tokenizer, safetensors) that "
        "AutoModelForCausalLM.from_pretrained loads. Runs in one process. See docs/distributed.md.",
        epilog="examples:\n  posttrain convert runs/grpo-20261123-101500/checkpoints/step_000050 hf_model/\n"
        "  posttrain convert runs/grpo-20261123-101500 hf_model/   # the run's latest checkpoint\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", metavar="SRC", help="a sharded checkpoint folder, or a run folder (its latest checkpoint)")
    convert.add_argument("output", metavar="DST", help="new (or empty) folder for the Hugging Face model")


def _convert(args: argparse.Namespace) -> int:
    _setup_console_logging()
    from posttrain.checkpoint.sharded import convert_to_hf  # heavy imports only now

    output = convert_to_hf(args.source, args.output)
    print(f"converted: {output}")
    return EXIT_OK


def _add_report_parsers(commands: argparse._SubParsersAction) -> None:
    """``posttrain report`` and ``posttrain view``: look at run folders (docs/report.md)."""
    report = commands.add_parser(
        "report",
        help="write an HTML report of one or more runs (plots, validation and rollout samples)",
        description="Write one self-contained HTML page (and a PNG per plot) from run folders: reward, accuracy, "
        "KL, entropy, response length, clip fraction, grad norm, timing, sync, staleness and more over steps "
        "(several runs overlaid), the best and worst samples of each validation, and the rollout samples with "
        "tokens coloured by engine/trainer logprob mismatch or entropy. Needs the report extra: "
        "pip install 'posttrain[report]'. See docs/report.md.",
        epilog="examples:\n  posttrain report runs/grpo-20261123-101500            # writes runs/grpo-.../report/report.html\n"
        "  posttrain report runs/grpo-a runs/grpo-b --output compare/  # two runs overlaid\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (trainer.output_dir of a run)")
    report.add_argument("--output", "-o", default="", metavar="DIR",
                        help="folder for report.html and the PNGs (default: RUN_DIR/report for one run, "
                        "./report for several)")
    view = commands.add_parser(
        "view",
        help="show a run's rollout samples in the terminal, tokens coloured by mismatch or entropy",
        description="Show the rollout samples of one step (samples.jsonl, written every logging.samples_every "
        "steps): each GRPO group with its prompt, then its completions with reward, advantage and tokens "
        "coloured by |trainer - rollout logprob| or by entropy. Plain text when not on a terminal. See docs/report.md.",
        epilog="examples:\n  posttrain view runs/grpo-20261123-101500             # the last step with samples\n"
        "  posttrain view runs/grpo-20261123-101500 --step 50 --color entropy\n"
        "  posttrain view runs/grpo-20261123-101500 --html samples.html\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    view.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    view.add_argument("--step", type=int, default=None, help="the step to show (default: the last one with samples)")
    view.add_argument("--color", "--colour", default="mismatch", choices=["mismatch", "entropy"],
                      help="what the token colours show (default: mismatch)")
    view.add_argument("--html", default="", metavar="OUT", help="write the view as a self-contained HTML file instead")


def _report(args: argparse.Namespace) -> int:
    from posttrain.report.cli import report  # matplotlib only now

    return report(args)


def _view(args: argparse.Namespace) -> int:
    from posttrain.report.cli import view  # matplotlib (view --html) only now

    return _quiet_on_closed_stdout(lambda: view(args))


def _quiet_on_closed_stdout(command: Callable[[], int]) -> int:
    """Run a command whose output is the point (view, --print-config) when its reader may stop
    early: after `posttrain view RUN | head`, head has what it wanted, so a closed pipe ends the
    command quietly with exit 0 instead of a BrokenPipeError. Only stdout's own pipe counts: the
    flush is inside, and the command writes nowhere else."""
    try:
        code = command()
        sys.stdout.flush()  # the last buffered lines: a closed pipe fails here, not at exit
        return code
    except BrokenPipeError:
        # The interpreter flushes stdout again at exit; /dev/null in its place keeps that quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:  # only a multi-process run has one to leave
        from posttrain.distributed import destroy_process_group  # torch: the CLI's own imports stay torch-free

        destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and an exit code (EXIT_CODES_HELP)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (`posttrain --debug grpo` or `posttrain grpo ... --debug`): tracebacks instead of one line.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        with sigterm_as_interrupt():  # SIGTERM raises Terminated, a KeyboardInterrupt: handled as Ctrl-C
            return _run(argv, debug)
    except Terminated:
        # The trainer has said which step it checkpointed; servers have stopped taking requests.
        print("posttrain: stopped by SIGTERM.", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        # The trainer has said which step it checkpointed (none when interrupted during set-up).
        print("posttrain: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        print(f"posttrain: {error_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_RUNTIME


def error_line(exc: Exception) -> str:
    """What the CLI prints for ``exc``: a PosttrainError's own message (written for users); for
    anything else its type and first line, and how to see the traceback."""
    # Bounded: messages may carry text from user code (an environment's exception, a traceback).
    if isinstance(exc, ConfigError):
        return f"config error: {clip_text(str(exc), TRACEBACK_LIMIT)}"
    if isinstance(exc, PosttrainError):
        return f"error: {clip_text(str(exc), TRACEBACK_LIMIT)}"
    text = describe_os_error(exc) if isinstance(exc, OSError) else str(exc).strip()
    first = clip_text(text.splitlines()[0]) if text else ""
    return f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)"


def _run(argv: list[str], debug: bool) -> int:
    parser = build_parser()
    # parse_known_args, so overrides may also follow an option: `grpo a=1 --config x b=2`.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.exists(resume):
        # `--resume trainer.lr=1e-4`: argparse took the override for --resume's optional PATH.
        args.overrides, args.resume = [resume, *args.overrides], ""
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.command == "merge":
        return _merge(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "rollout-api":
        return _rollout_api(args)
    if args.command == "report":
        return _report(args)
    if args.command == "view":
        return _view(args)
    schema = SCHEMAS[args.command]
    resume, run_config = args.resume, None
    if resume == RESUME_AUTO and not os.path.exists(RESUME_AUTO):
        resume = _resume_auto(load_config(schema, args.config, args.overrides, validate=False).trainer.output_dir)
    if resume == "":
        # Not validated yet: options the saved config holds (data.train_path) may be missing here.
        output_dir = load_config(schema, args.config, args.overrides, validate=False).trainer.output_dir
        if not output_dir:
            raise ConfigError("--resume without a PATH needs trainer.output_dir=<run folder> to find the latest checkpoint.")
        resume = output_dir
    if resume is not None:
        # A resume continues the run as it was configured: its saved config.yaml, then --config and
        # the overrides where given (e.g. a larger trainer.max_steps).
        check_utf8_text(resume, "--resume PATH")
        run_config = saved_run_config(resume)
        if run_config is not None:
            check_utf8_file(run_config, "The run's saved config")
    if args.config and os.path.isfile(args.config):
        check_utf8_file(args.config, "--config")
    cfg = load_config(schema, args.config, args.overrides, run_config=run_config)
    check_utf8_settings(cfg)  # before anything is created: every setting is written to config.yaml
    if args.print_config:
        def print_config() -> int:
            print(config_to_yaml(cfg), end="")
            return EXIT_OK

        return _quiet_on_closed_stdout(print_config)
    _setup_console_logging()
    if resume is not None and run_config is None:
        logging.getLogger("posttrain").warning(
            "No %s found for the run of '%s' (in the run folder, next to checkpoints/): resuming with the defaults, "
            "--config and the overrides alone. Give the run's settings with --config FILE if they differ.",
            RUN_CONFIG_FILE, resume)
    if args.dry_run:
        from posttrain.trainer.dry_run import dry_run  # heavy imports only now

        return dry_run(args.command, cfg)
    num_processes = getattr(cfg.trainer, "num_processes", 1)
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:  # not yet a torchrun worker: start them
        from posttrain.distributed.launch import relaunch  # torch's elastic launcher only now

        if args.command == "grpo":  # moe.* mistakes once, here, not from every worker after the launch
            from posttrain.models.moe import check_moe_config  # imports torch: only once a run starts

            check_moe_config(cfg, None)

        return relaunch(num_processes, argv + ["--debug"] * debug, cfg.trainer.dist_timeout_s)
    module_name, function_name = COMMANDS[args.command][2].split(":")
    train = getattr(importlib.import_module(module_name), function_name)  # heavy imports only now

    try:
        output_dir = train(cfg, resume_from=resume)
    except BaseException:
        from posttrain.trainer.common import undo_failed_resume, undo_failed_start  # torch: loaded by train already

        if resume is not None:
            undo_failed_resume()  # a resume that never saved a checkpoint leaves config.yaml as it was
        undo_failed_start()  # a new run that wrote nothing of its own leaves no run folder behind
        raise
    finally:
        from posttrain.trainer.run_lock import release_run_folder  # (the CLI's own imports stay torch-free)

        release_run_folder()  # another run may use the folder now (the lock dies with the process anyway)
        _leave_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {output_dir}")
    return EXIT_OK


# trainer/common.CONFIG_FILE and checkpoint/manager.CHECKPOINTS_SUBDIR, spelled out here because
# those modules import torch, which the CLI imports only once it trains.
RUN_CONFIG_FILE = "config.yaml"
RUN_CHECKPOINTS_SUBDIR = "checkpoints"


RESUME_AUTO = "auto"


def _resume_auto(output_dir: str) -> str | None:
    """``--resume auto``: the run folder to resume when trainer.output_dir holds a checkpoint, else
    None (a new run there). The same command line then serves the first start of a preemptible job
    and every restart (Slurm --requeue, a Kubernetes Job's retries)."""
    if not output_dir:
        raise ConfigError("--resume auto needs trainer.output_dir=<run folder>: a fixed folder that every "
                          "restart of the job finds again.")
    folder = Path(output_dir)
    # A checkpoint folder's name, as checkpoint/manager.py lists them; which of them is complete
    # is decided there (a broken latest one is skipped for the newest complete one).
    if any((folder / RUN_CHECKPOINTS_SUBDIR).glob("step_*")) or any((folder / RUN_CHECKPOINTS_SUBDIR).glob("adapter_step_*")):
        return output_dir
    _setup_console_logging()  # the line must show: it is the only sign that nothing was resumed
    logging.getLogger("posttrain").info("--resume auto: no checkpoint in %s yet, starting a new run there.", folder)
    return None


def saved_run_config(resume: str) -> Path | None:
    """The config.yaml of the run that ``--resume PATH`` names (PATH: a run folder, its checkpoints/
    folder or a checkpoint in it), or None where there is none."""
    path = Path(resume)
    folders = [path]
    if path.name == RUN_CHECKPOINTS_SUBDIR:
        folders.append(path.parent)
    if path.parent.name == RUN_CHECKPOINTS_SUBDIR:
        folders.append(path.parent.parent)
    return next((f / RUN_CONFIG_FILE for f in folders if (f / RUN_CONFIG_FILE).is_file()), None)


def _setup_console_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("posttrain").setLevel(logging.INFO)
    # transformers' per-call notices (e.g. about generation flags) would drown the progress bar.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging  # heavy: only commands that run a model get here

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
