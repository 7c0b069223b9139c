"""Greedy accuracy of a model on arithmetic problems the default run never trains on.

The embedded task's level 2 is two-digit +/- one-digit and one-digit x one-digit; this set is
``a op b`` with both ``a`` and ``b`` in 10..99, so no problem can appear in training. It measures
whether GRPO on the default task taught something that carries over, not only the training pool.

    python bench/heldout_eval.py                                   # the embedded SmolLM2, before training
    python bench/heldout_eval.py --model runs/grpo-X/checkpoints/step_000050
    python bench/heldout_eval.py --model embedded --model runs/grpo-X/checkpoints/step_000050 --json out.json

Prompts get the default task's instruction and chat template; scoring is the default `math`
environment (math-verify), accuracy = reward without the format bonus. An answer that is the
expression instead of its value (``\\boxed{47 \\times 83}``) scores 0 (``env.kwargs.literal_answers``);
the ``expr`` column counts them.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.data.example import DEFAULT_MATH_INSTRUCTION, PromptExample
from posttrain.data.prompts import append_instruction
from posttrain.envs.reward_pool import RewardPool
from posttrain.models import load_model_and_tokenizer, resolve_compute_dtype, resolve_device
from posttrain.data.chat import encode_prompts
from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.trainer.validation import validate


OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def heldout_problems(num: int, seed: int) -> list[PromptExample]:
    """``num`` distinct problems ``a op b`` (a, b in 10..99; op in + - *; a >= b for -)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[PromptExample] = []
    while len(out) < num:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        if op == "-" and a < b:
            a, b = b, a
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        # "level": validation then reports the accuracy per operation (+ and - are the task's kind of
        # problem with a bigger second operand; two-digit products are far harder for a small model)
        example = PromptExample([{"role": "user", "content": question}],
                                {"expected_answer": str(answer), "op": op, "level": OP_NAMES[op]})
        out.append(append_instruction(example, DEFAULT_MATH_INSTRUCTION))
    return out


def evaluate(model_path: str, problems: list[PromptExample], device: str, max_new_tokens: int) -> dict[str, float]:
    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", f"model.device={device}"])
    torch_device = resolve_device(cfg.model.device)
    compute_dtype = resolve_compute_dtype(cfg.model.dtype, torch_device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, torch_device)
    model.eval()
    prompts = encode_prompts(problems, tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template,
                             system_prompt=cfg.model.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
                             what="held-out prompts")
    engine = build_engine(cfg.rollout, model, tokenizer, compute_dtype, max_model_len=engine_max_model_len(cfg, model),
                          float32_logits=cfg.model.float32_logits, expert_dtype=cfg.moe.expert_dtype)
    start = time.perf_counter()
    try:
        with RewardPool(cfg.env.cls, cfg.env.kwargs, cfg.env.num_workers, cfg.env.timeout_s) as rewards:
            metrics = validate(engine, rewards, prompts, max_tokens=max_new_tokens, stop=list(cfg.rollout.stop))
    finally:
        if hasattr(engine, "close"):
            engine.close()
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="model path (hub id, folder, .gguf, 'embedded'); repeat to compare (default: embedded)")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    problems = heldout_problems(args.num, args.seed)
    results = {path: evaluate(path, problems, args.device, args.max_new_tokens) for path in args.model or ["embedded"]}
    print(f"\n{args.num} held-out problems a op b, a,b in 10..99 (seed {args.seed}), greedy")
    ops = [f"val/accuracy_level_{name}" for name in OP_NAMES.values()]
    print(f"{'model':<48} {'accuracy':>9} {'add':>6} {'sub':>6} {'mul':>6} {'format':>7} {'expr':>6} {'length':>7} {'s':>6}")
    for path, m in results.items():  # expr: answers that were the expression, not its value (scored 0)
        print(f"{path[-48:]:<48} {m.get('val/accuracy', float('nan')):>9.3f} "
              + " ".join(f"{m.get(k, float('nan')):>6.3f}" for k in ops)
              + f" {m.get('val/format_rate', float('nan')):>7.3f} {m.get('val/expression_answer_rate', float('nan')):>6.3f} "
              f"{m['val/response_length_mean']:>7.1f} {m['seconds']:>6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
