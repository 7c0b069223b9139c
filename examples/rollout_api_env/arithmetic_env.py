"""An environment process for the rollout API: arithmetic problems, generated through a
`posttrain serve` server's /generate, scored by the built-in math environment, submitted as groups.

    posttrain rollout-api --port 8100 --journal runs/rollout_api.jsonl
    posttrain serve --port 8000                     # the embedded model; or --model a checkpoint folder
    python examples/rollout_api_env/arithmetic_env.py --api http://127.0.0.1:8100 \
        --server http://127.0.0.1:8000 --tokenizer embedded --name arith-1
    posttrain grpo rollout.source=api rollout.api_url=http://127.0.0.1:8100 rollout.group_size=8

--tokenizer takes what model.path takes (embedded, a model folder, a hub id) and must match the
server's model.

Start as many as you like (different --name and --seed). Each one runs until --max-groups groups are
submitted (0: until stopped). A full queue makes submit_group wait (429s are retried), so an
environment never runs far ahead of the trainer.
"""

from __future__ import annotations

import argparse
import logging
import random

import httpx

from posttrain.config.schema import ModelConfig
from posttrain.data.arithmetic import generate_arithmetic_problems
from posttrain.data.example import DEFAULT_MATH_INSTRUCTION
from posttrain.data.prompts import append_instruction
from posttrain.envs.client import RolloutAPIClient
from posttrain.envs.math_env import MathEnvironment
from posttrain.data.chat import format_prompt
from posttrain.models.loading import load_tokenizer, model_source

logger = logging.getLogger("arithmetic_env")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="the rollout API, e.g. http://127.0.0.1:8100")
    parser.add_argument("--server", required=True, help="a `posttrain serve` server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--tokenizer", required=True,
                        help="the policy's tokenizer: 'embedded' (no download), a model folder or a hub id")
    parser.add_argument("--name", required=True, help="this environment's name (metrics: api/groups/NAME)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (= rollout.group_size)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="must equal the trainer's rollout.temperature")
    parser.add_argument("--difficulty", type=int, default=2, help="arithmetic levels 1..difficulty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-groups", type=int, default=0, help="stop after this many groups (0: never)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name}: %(message)s")

    model = ModelConfig(path=args.tokenizer)  # the same names as model.path: embedded, a folder, a hub id
    tokenizer = load_tokenizer(model_source(model), model)
    env = MathEnvironment()
    api = RolloutAPIClient(args.api, max_retries=None, max_backoff_s=2.0)  # wait for the trainer as long as it takes
    api.register(args.name, args.group_size)
    rng = random.Random(args.seed)
    with httpx.Client(base_url=args.server, timeout=600) as server:
        submitted = 0
        while not args.max_groups or submitted < args.max_groups:
            [example] = generate_arithmetic_problems(1, args.difficulty, rng.randrange(2**31))
            example = append_instruction(example, DEFAULT_MATH_INSTRUCTION)
            prompt = format_prompt(example.messages, tokenizer, use_chat_template=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            # The version of the weights that generate this group. This reads the trainer's current
            # version, which is right when the server gets new weights every step (weight sync).
            version = api.policy_version()
            resp = server.post("/generate", json={"input_ids": prompt_ids, "sampling_params": {
                "n": args.group_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "seed": rng.randrange(2**31), "logprobs": True}})
            resp.raise_for_status()
            outputs = resp.json()
            outputs = outputs if isinstance(outputs, list) else [outputs]
            logs = [example.messages + [{"role": "assistant", "content": o["text"]}] for o in outputs]
            scored = env.step(logs, [example.metadata] * len(outputs))
            status = api.submit_group(
                prompt_ids, [o["output_ids"] for o in outputs], scored.rewards.tolist(), policy_version=version,
                logprobs=[o["logprobs"] for o in outputs], finish_reasons=[o["finish_reason"] for o in outputs],
                metadata={"level": example.metadata["level"]},
            )
            submitted += 1
            logger.info("group %d (policy version %d, mean reward %.2f): %s", submitted, version,
                        scored.rewards.mean().item(), status)


if __name__ == "__main__":
    main()
