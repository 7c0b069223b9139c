"""CPU generation: posttrain's engine vs ``transformers.generate`` at batch 16, as RL uses them.

The real embedded SmolLM2-135M-Instruct (fp32) samples completions (temperature 1, up to
``--max-tokens``, stopping at EOS) for the first ``--prompts`` GSM8K test questions with the chat
template. ``generate`` runs the 16 rows together until the longest one ends; the engine drops
finished sequences from the batch. Rate = completion tokens actually produced (up to and including
EOS) / wall time. Each backend samples its own completions, so lengths differ a little; the
table reports them. The engine returns each token's logprob as it samples; the `hf` backend (the
reference engine) gets them from a teacher-forced pass afterwards, as RL needs them;
`hf_no_logprobs` is `generate` alone; `hf_bf16` is `generate` alone on a bf16 copy of the model.

  python bench/rollout_cpu.py --gsm8k ../shared/data/gsm8k/test.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch

from posttrain.config.schema import ModelConfig
from posttrain.data.gsm8k import load_gsm8k
from posttrain.engine import Engine
from posttrain.data.chat import encode_prompts
from posttrain.models import load_model_and_tokenizer
from posttrain.sampling import SamplingParams
from posttrain.rollout.hf_engine import HFEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", default="../shared/data/gsm8k/test.jsonl")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="engine,engine_bf16,hf,hf_no_logprobs",
                        help="engine (fp32); engine_bf16 (rollout.engine.cpu_dtype=bfloat16); hf: generate + the "
                             "teacher-forced logprob pass RL needs; hf_no_logprobs: generate alone; "
                             "hf_bf16: generate alone on a bf16 copy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), torch.device("cpu"))
    model.eval()
    examples = load_gsm8k(args.gsm8k)[: args.prompts]
    prompts = [p.token_ids for p in encode_prompts(examples, tokenizer, use_chat_template=True, max_prompt_tokens=512)]
    params = SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, logprobs=True)
    hf = HFEngine(model, tokenizer, generation_batch_size=args.prompts)
    available = {
        "engine": ("posttrain engine", Engine(model, tokenizer, max_model_len=512 + args.max_tokens), params),
        "engine_bf16": ("posttrain engine, cpu_dtype=bfloat16",
                        Engine(model, tokenizer, max_model_len=512 + args.max_tokens, cpu_dtype=torch.bfloat16), params),
        "hf": ("transformers generate + logprobs", hf, params),
        "hf_no_logprobs": ("transformers generate alone", hf, SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, logprobs=False)),
    }
    if "hf_bf16" in args.backends.split(","):  # a bf16 copy of the model, generate alone
        import copy

        hf_bf16 = HFEngine(copy.deepcopy(model).to(torch.bfloat16), tokenizer, generation_batch_size=args.prompts)
        available["hf_bf16"] = ("transformers generate alone, bf16 model", hf_bf16,
                                SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, logprobs=False))
    engines = {available[b][0]: available[b][1:] for b in args.backends.split(",")}
    rows = []
    for repeat in range(args.repeats):
        for name, (engine, backend_params) in engines.items():
            torch.manual_seed(repeat)
            start = time.perf_counter()
            out = engine.generate(prompts, backend_params)
            seconds = time.perf_counter() - start
            lengths = [len(c.token_ids) for group in out for c in group]
            rows.append((name, repeat, sum(lengths), max(lengths), seconds))
            print(rows[-1], flush=True)
    print(f"\n{args.prompts} GSM8K prompts, SmolLM2-135M fp32, {torch.get_num_threads()} threads, max {args.max_tokens} tokens")
    print("| backend | run | completion tokens | longest | seconds | tokens/s |\n|---|---:|---:|---:|---:|---:|")
    for name, repeat, tokens, longest, seconds in rows:
        print(f"| {name} | {repeat} | {tokens} | {longest} | {seconds:.1f} | {tokens / seconds:.1f} |")
    for name in engines:
        rate = sum(r[2] for r in rows if r[0] == name) / sum(r[4] for r in rows if r[0] == name)
        print(f"{name}: {rate:.1f} tokens/s over all runs")


if __name__ == "__main__":
    main()
