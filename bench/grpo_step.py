"""One GRPO step of TRL's workload, posttrain and TRL's GRPOTrainer side by side in one process.

    python bench/grpo_step.py                                   # 0.5B shape, 8 steps, both frameworks
    python bench/grpo_step.py --shape qwen2.5-1.5b --json out.json
    python bench/grpo_step.py --device cpu --shape tiny --steps 4 --warmup 1 --max-new-tokens 32   # CPU check

The workload (issue 36): a randomly initialised model of a real shape (bench/random_model.py:
Qwen2.5-0.5B or 1.5B, or ``tiny`` for a CPU check; speed does not depend on the weight values) with
its character-level tokenizer and ChatML template; each step 8 prompts x 8 completions = 64
completions of at most 256 new tokens, KL 0.04 to a frozen reference, one optimizer step per 64
completions. TRL runs when ``import trl`` works (else its row says why and posttrain still runs);
a failure inside TRL's run is reported the same way.

Settings that must match, and how each is set here (both sides get the same value):

- model: the same folder written once by random_model.py (bf16 safetensors); prompts: the same
  user messages (2,000 "What is 12 + 34? ..." questions, 90 prompt tokens each after the chat
  template), of which each framework's own seeded sampler draws 8 per step;
- completions per step: 64 = 8 prompts x group size 8 (posttrain rollout.batch_size=64,
  rollout.group_size=8; TRL num_generations=8, generation_batch_size 64 =
  per_device_train_batch_size x gradient_accumulation_steps);
- one optimizer step per 64 completions (posttrain trainer.mini_batch_size=64; TRL
  gradient_accumulation_steps = 64 / --trl-micro-batch, steps_per_generation = the same, so no
  completion is reused and TRL computes no separate old-logprob pass), num_iterations / ppo_epochs 1;
- max new tokens 256 (rollout.max_new_tokens / max_completion_length), temperature 1, top_p 1,
  top_k off; a random model almost never samples the end token, so nearly every completion is 256;
- KL coefficient 0.04, k3 estimator (algorithm.kl_coef / beta): both load a reference model and run
  one reference-logprob pass per step;
- loss: PPO clip 0.2, token-mean aggregation (posttrain token-mean; TRL loss_type='dapo'), group
  reward normalisation; AdamW lr 1e-6 (TRL's default), constant schedule, betas (0.9, 0.99), no weight
  decay, gradient clipping at 1.0;
- precision: bf16 compute on GPU, float32 parameters and AdamW states in both (posttrain's default
  model.dtype=auto + trainer.param_dtype=float32; TRL: model_init_kwargs dtype=float32 with bf16=True,
  i.e. autocast). ``--trl-dtype bfloat16`` gives TRL's own default instead (transformers 5 loads
  the checkpoint's bf16: pure-bf16 parameters, less memory and time, not the same arithmetic).
  On CPU both run float32;
- generation: TRL with use_vllm=False (transformers ``generate`` on the training model, TRL's
  default); posttrain with its default rollout.backend=engine;
- gradient checkpointing off in both (TRL's GRPOConfig default is on: ``--trl-gradient-checkpointing``
  restores it); the same reward, bench/grpo_step_env.py (fraction of digits in the completion).

Differences that stay (each framework's defaults): posttrain recomputes the old logprobs with the
trainer (rollout.recompute_logprobs=true: one more no-grad pass than TRL, inside its ``score``
time; pass ``--posttrain-override rollout.recompute_logprobs=false`` to drop it), packs completions
into micro-batches of 4096 tokens (trainer.micro_batch_tokens) where TRL pads micro-batches of
``--trl-micro-batch`` completions, and scores rewards in 2 worker processes (env.num_workers).

Reported per framework: seconds per step (median of the steps after ``--warmup``, wall time between
the ends of consecutive steps; also the fastest of them), the generate / score / update split (each
its own median over the same steps; posttrain's time/generate, time/score, time/train from
metrics.jsonl; TRL's from wrapping ``_generate`` (generation, decoding)
and ``_generate_and_score_completions`` (the rest of it, reference logprobs and rewards:
"score"); update = the step's time less both, so it includes TRL's logging), generated tokens per
second of step time, peak GPU memory (torch.cuda.max_memory_allocated, reset before each framework)
and the ratio TRL / posttrain.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # random_model, grpo_step_env (spawned reward workers get sys.path too)

QUIET = ["logging.progress_bar=false", "logging.console_every=0", "validation.every=0", "validation.at_start=false",
         "validation.at_end=false", "checkpoint.every=0", "logging.samples_every=0"]
LR, KL, BETAS = 1e-6, 0.04, (0.9, 0.99)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Think step by step, then give the answer as a "
            f"number." for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def summarise(name: str, steps: list[dict], warmup: int, device: str, extra: dict) -> dict:
    """steps: per step ``s`` (wall time), ``generate``, ``score``, ``update`` (s) and ``tokens``."""
    timed = steps[warmup:]
    med = lambda key: statistics.median(s[key] for s in timed)
    s_step = med("s")
    tokens = statistics.mean(s["tokens"] for s in timed)
    return {"framework": name, "s_per_step": s_step, "best_s": min(s["s"] for s in timed), "generate_s": med("generate"), "score_s": med("score"),
            "update_s": med("update"), "tokens_per_step": tokens, "tokens_per_s": tokens / s_step,
            "peak_gib": peak_gib(device), "timed_steps": len(timed), "steps": steps, **extra}


# -- posttrain ---------------------------------------------------------------------------------------


def run_posttrain(args, model_dir: str, prompts_file: Path, out_root: Path) -> dict:
    from posttrain.config.loader import load_config
    from posttrain.config.schema import GRPOConfig
    from posttrain.trainer.grpo import train

    out = out_root / "posttrain"
    overrides = [
        f"model.path={model_dir}", f"model.device={args.device}", f"seed={args.seed}",
        f"trainer.max_steps={args.steps}", f"trainer.output_dir={out}", *QUIET,
        "data.task=prompts", f"data.train_path={prompts_file}", "env.cls=grpo_step_env.DigitFractionEnv",
        f"rollout.batch_size={args.batch}", f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", f"trainer.mini_batch_size={args.batch}", f"algorithm.kl_coef={KL}",
        "algorithm.kl_estimator=k3", "algorithm.loss_agg_mode=token-mean", "algorithm.ppo_epochs=1",
        f"trainer.lr={LR}", "trainer.lr_scheduler=constant", f"trainer.adam_beta1={BETAS[0]}",
        f"trainer.adam_beta2={BETAS[1]}", "trainer.weight_decay=0.0", "trainer.max_grad_norm=1.0",
        "model.gradient_checkpointing=false", *args.posttrain_override,
    ]
    cfg = load_config(GRPOConfig, None, overrides)
    reset_memory(args.device)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in sorted((m for m in lines if "time/generate" in m), key=lambda m: m["step"])]
    steps, previous = [], None
    for m in metrics:
        # wall time between the ends of consecutive steps; step 1 only has its own time/step
        s = m["timestamp"] - previous if previous is not None else m["time/step"]
        previous = m["timestamp"]
        gen, score, upd = m["time/generate"], m.get("time/score", 0.0), m["time/train"]
        steps.append({"step": m["step"], "s": s, "generate": gen, "score": score, "update": upd,
                      "tokens": m["response/length_mean"] * args.batch})
    return summarise("posttrain", steps, args.warmup, args.device,
                     {"wall_s": wall, "overrides": overrides, "note": "phases from metrics.jsonl"})


# -- TRL -----------------------------------------------------------------------------------------------


def trl_unavailable() -> str | None:
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"import trl failed: {type(e).__name__}: {e}"
    return None


def run_trl(args, model_dir: str, prompts: list[str], out_root: Path) -> dict:
    import trl
    from datasets import Dataset
    from grpo_step_env import digit_fraction_reward
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    device = args.device
    calls: list[dict] = []  # one per generation batch = one per optimizer step

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            sync(device)
            calls[-1]["generate"] = time.perf_counter() - t0
            calls[-1]["tokens"] = sum(len(ids) for ids in out[1])
            return out

        def _generate_and_score_completions(self, inputs):
            calls.append({})
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(device)
            calls[-1]["gen_and_score"] = time.perf_counter() - t0
            return out

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(device)
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            ends.append(time.perf_counter())

    micro = args.trl_micro_batch
    if args.batch % micro:
        raise SystemExit(f"--trl-micro-batch {micro} must divide --batch {args.batch}")
    on_gpu = device.startswith("cuda")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.trl_dtype] if on_gpu else torch.float32
    config = GRPOConfig(
        output_dir=str(out_root / "trl"), max_steps=args.steps, seed=args.seed, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=not on_gpu, bf16=on_gpu,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, use_vllm=False, beta=KL, num_iterations=1,
        loss_type="dapo", epsilon=0.2, scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=args.trl_gradient_checkpointing,
        model_init_kwargs={"dtype": dtype},
    )
    n_prompts = args.steps * args.batch // args.group_size
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts[:n_prompts]])
    reset_memory(device)
    start = time.perf_counter()
    trainer = TimedGRPOTrainer(model=model_dir, reward_funcs=digit_fraction_reward, args=config,
                               train_dataset=dataset, callbacks=[StepClock()])
    load_s = time.perf_counter() - start
    trainer.train()
    wall = time.perf_counter() - start
    checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))  # as the run had it
    intervals = [b - a for a, b in itertools.pairwise(ends)]
    steps = []
    for i, (s, c) in enumerate(zip(intervals, calls), 1):
        steps.append({"step": i, "s": s, "generate": c["generate"], "score": c["gen_and_score"] - c["generate"],
                      "update": s - c["gen_and_score"], "tokens": c["tokens"]})
    result = summarise("trl", steps, args.warmup, device,
                       {"wall_s": wall, "load_s": load_s, "version": trl.__version__,
                        "param_dtype": str(dtype).removeprefix("torch."),
                        "gradient_checkpointing": checkpointing, "micro_batch": micro,
                        "note": "phases from wrapping _generate and _generate_and_score_completions"})
    del trainer
    return result


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="a shape of bench/weight_sync.py's SHAPES")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians (engine warm-up, graph capture)")
    parser.add_argument("--batch", type=int, default=64, help="completions per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frameworks", default="posttrain,trl", help="run order, comma-separated")
    parser.add_argument("--trl-micro-batch", type=int, default=8, help="TRL per_device_train_batch_size")
    parser.add_argument("--trl-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="TRL parameter dtype on GPU (float32 + bf16 autocast matches posttrain)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's GRPOConfig default")
    parser.add_argument("--posttrain-override", action="append", default=[], help="extra key=value for posttrain")
    parser.add_argument("--model", default="", help="an existing model folder (default: write the random shape)")
    parser.add_argument("--out", default="", help="work folder (default: a temp folder)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    out_root = Path(args.out or tempfile.mkdtemp(prefix="grpo-step-"))
    out_root.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if not model_dir:
        import random_model

        model_dir = str(out_root / f"{args.shape}-random")
        random_model.main(["--shape", args.shape, "--out", model_dir])
    prompts = make_prompts(max(2000, args.steps * args.batch // args.group_size), args.seed)
    prompts_file = out_root / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    header = (f"{args.shape} on {gpu}: {args.batch // args.group_size} prompts x {args.group_size} completions x "
              f"{args.max_new_tokens} new tokens, KL {KL}, lr {LR}, {args.steps} steps (median after {args.warmup})")
    print(header, flush=True)

    results: list[dict] = []
    for name in args.frameworks.split(","):
        if name == "trl" and (reason := trl_unavailable()):
            print(f"trl: skipped ({reason})", flush=True)
            results.append({"framework": "trl", "skipped": reason})
            continue
        try:
            r = (run_posttrain(args, model_dir, prompts_file, out_root) if name == "posttrain"
                 else run_trl(args, model_dir, prompts, out_root))
        except Exception as e:
            if name == "posttrain":
                raise
            traceback.print_exc()
            r = {"framework": name, "skipped": f"failed: {type(e).__name__}: {e}"}
        results.append(r)
        if "skipped" not in r:
            print(f"{name}: {r['s_per_step']:.3f} s/step (generate {r['generate_s']:.3f}, score {r['score_s']:.3f}, "
                  f"update {r['update_s']:.3f}), {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.1f} GiB", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"header": header, "args": vars(args), "results": results}, indent=1))
        reset_memory(args.device)

    by = {r["framework"]: r for r in results if "skipped" not in r}
    ratio = by["trl"]["s_per_step"] / by["posttrain"]["s_per_step"] if {"trl", "posttrain"} <= by.keys() else None
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "args": vars(args), "results": results,
                                               "trl_over_posttrain": ratio}, indent=1))
    print(f"\n{header}")
    print("| framework | s/step | fastest s | generate s | score s | update s | tok/s | peak GiB | x posttrain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['framework']} | {r['skipped']} | | | | | | | |")
            continue
        x = r["s_per_step"] / by["posttrain"]["s_per_step"] if "posttrain" in by else float("nan")
        label = r["framework"] + (f" {r['version']}" if "version" in r else "")
        print(f"| {label} | {r['s_per_step']:.3f} | {r['best_s']:.3f} | {r['generate_s']:.3f} | {r['score_s']:.3f} | {r['update_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {x:.2f} |")
    if ratio is not None:
        print(f"TRL / posttrain: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
