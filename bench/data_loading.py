"""Peak memory and time to the first training batch of an RL recipe's prompt data (issue 32).

Runs what grpo/ppo do before step 1 with the data (trainer/setup.py): ``load_rl_prompt_data``
(read, validate, carve the validation rows, check each row reaches the math environment),
``encode_rl_prompts`` (chat template, tokenise, drop prompts over data.max_prompt_tokens), the
epoch sampler and the first batch of prompts. No model is loaded. Each case runs in a fresh
process; peak RSS is that process's ``ru_maxrss``, and "over imports" subtracts the RSS once
torch/transformers are imported and the tokenizer is built.

The tokenizer is a byte-level BPE (the GPT-2 / Llama 3 / Qwen kind) trained in-process on
arithmetic text, vocabulary 1,000, with a ChatML chat template: no download.

    python bench/data_loading.py                       # both cases, this checkout
    python bench/data_loading.py --rows 100000 --cases tiny
    PYTHONPATH=/tmp/before python bench/data_loading.py   # another checkout's posttrain
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny(path: str, rows: int) -> None:
    """``rows`` rows like {"prompt": "1+1", "expected_answer": "2"}."""
    with open(path, "w") as f:
        for i in range(rows):
            a, b = i % 97, i % 89
            f.write(f'{{"prompt": "{a}+{b}", "expected_answer": "{a + b}"}}\n')


def write_large(path: str, rows: int, mib: int) -> None:
    """``rows`` rows of ``mib`` MiB of prompt text each, then 64 tiny rows (so training could start)."""
    text = "What is 12 + 30? " * ((mib << 20) // 17)
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": text, "expected_answer": str(i)}) + "\n" for i in range(rows))
        f.writelines(f'{{"prompt": "{i}+1", "expected_answer": "{i + 1}"}}\n' for i in range(64))


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    corpus = [f"What is {a} + {b}? The answer is {a + b}. user assistant" for a in range(60) for b in range(60)]
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=CHATML)


def child(path: str, batch: int) -> dict:
    """In a fresh process: load, check, encode, sample the first batch; timings and peak memory."""
    from posttrain.config import GRPOConfig
    from posttrain.config.loader import load_config
    from posttrain.data.sampler import EpochSampler
    from posttrain.envs.registry import env_specs, resolve_env_classes
    from posttrain.trainer.setup import encode_rl_prompts, load_rl_prompt_data

    tokenizer = make_tokenizer()
    base_rss = _rss_mib()
    cfg = load_config(GRPOConfig, overrides=["data.task=prompts", f"data.train_path={path}"])
    start = time.perf_counter()
    train, val = load_rl_prompt_data(cfg, resolve_env_classes(env_specs("math", {})))
    loaded = time.perf_counter()
    train_prompts, val_prompts = encode_rl_prompts(cfg, tokenizer, train, val)
    encoded = time.perf_counter()
    sampler = EpochSampler(len(train_prompts), batch, cfg.seed, cfg.data.shuffle)
    first = [train_prompts[i] for i in sampler.next_batch()]
    done = time.perf_counter()
    assert len(first) == batch and all(p.token_ids for p in first)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"train_prompts": len(train_prompts), "val_prompts": len(val_prompts), "load_s": loaded - start,
            "encode_s": encoded - loaded, "first_batch_s": done - start, "peak_rss_mib": peak,
            "peak_over_imports_mib": peak - base_rss, "rss_after_mib": _rss_mib() - base_rss}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,large", help="comma-separated: tiny, large")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the tiny case")
    parser.add_argument("--large-rows", type=int, default=3, help="15 MiB rows of the large case")
    parser.add_argument("--large-mib", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch (grpo: batch_size / group_size)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            path = os.path.join(tmp, f"{case}.jsonl")
            if case == "tiny":
                write_tiny(path, args.rows)
                what = f"{args.rows:,} tiny rows"
            else:
                write_large(path, args.large_rows, args.large_mib)
                what = f"{args.large_rows} rows of {args.large_mib} MiB + 64 tiny rows"
            size = os.path.getsize(path) / 2**20
            out = subprocess.run([sys.executable, __file__, "--child", path, "--batch", str(args.batch)],
                                 check=False, capture_output=True, text=True)
            if out.returncode:
                print(f"{case}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{what} ({size:.1f} MiB file): first batch after {r['first_batch_s']:.1f} s "
                  f"(load+check {r['load_s']:.1f} s, encode {r['encode_s']:.1f} s); peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"({r['peak_over_imports_mib']:.0f} MiB over imports), {r['rss_after_mib']:.0f} MiB held after; "
                  f"{r['train_prompts']:,} training / {r['val_prompts']} validation prompts", flush=True)


if __name__ == "__main__":
    main()
