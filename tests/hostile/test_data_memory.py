"""Prompt data whose memory a test bounds with ``resource`` limits (issue 32): what grpo/ppo do with
the data before step 1 (trainer/setup.py: load and check the prompts, tokenise them, sample the
first batch) runs in a child process whose address space is capped at what it had after its
imports plus a budget. Rows of 15 MiB and 100,000 tiny rows both fit in a budget far below what
holding the file as Python objects took (the tiny rows: about 3.8 KB each before, 380 MB here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

CHILD = textwrap.dedent("""
    import json, resource, sys
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from posttrain.config import GRPOConfig
    from posttrain.config.loader import load_config
    from posttrain.data.sampler import EpochSampler
    from posttrain.envs.registry import env_specs, resolve_env_classes
    from posttrain.trainer.setup import encode_rl_prompts, load_rl_prompt_data

    path, budget_mib, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    backend = Tokenizer(models.BPE())  # byte-level BPE, as GPT-2 / Llama 3 / Qwen
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([f"What is {a} + {b}?" for a in range(40) for b in range(40)], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{{ m['content'] }}<|im_end|>\\n{% endfor %}"
        "<|im_start|>assistant\\n"))
    tokenizer(["warm up", "the tokenizer's threads"] * 64)
    cfg = load_config(GRPOConfig, overrides=["data.task=prompts", f"data.train_path={path}", *overrides])
    envs = resolve_env_classes(env_specs("math", {}))

    def vm_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))

    limit = (vm_kib() + budget_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    train, val = load_rl_prompt_data(cfg, envs)
    train_prompts, val_prompts = encode_rl_prompts(cfg, tokenizer, train, val)
    sampler = EpochSampler(len(train_prompts), 16, cfg.seed, cfg.data.shuffle)
    batch = [train_prompts[i] for i in sampler.next_batch()]
    assert len(batch) == 16 and all(p.token_ids and p.metadata["expected_answer"] for p in batch)
    print(json.dumps({"train": len(train_prompts), "val": len(val_prompts)}))
""")


def run_bounded(path: str, budget_mib: int, overrides: list[str]) -> subprocess.CompletedProcess:
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # One malloc arena, and blocks over 128 KiB always mmapped (returned to the system when freed):
    # glibc otherwise reserves a 64 MiB arena for a second thread whenever threads first contend,
    # which on a loaded machine may fall before or after the baseline (free headroom, or the whole
    # budget gone), and its dynamic mmap threshold keeps large freed buffers in the heap.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "true",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", CHILD, path, str(budget_mib), json.dumps(overrides)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_rows_of_15_mib_stay_within_a_budget_of_about_six_rows(tmp_path):
    path = tmp_path / "large.jsonl"
    text = "What is 12 + 30? " * ((15 << 20) // 17)
    with open(path, "w") as f:
        # 120 MiB of prompts, each row too long for data.max_prompt_tokens=512, then 40 short ones.
        f.writelines(json.dumps({"prompt": text, "expected_answer": str(i)}) + "\n" for i in range(8))
        f.writelines(json.dumps({"prompt": f"What is {i} + 1?", "expected_answer": str(i + 1)}) + "\n" for i in range(40))
    validation = tmp_path / "validation.jsonl"
    validation.write_text('{"prompt": "What is 2 + 2?", "expected_answer": "4"}\n')
    # 96 MiB: a 15 MiB row is read into a growing buffer and then decoded (80 MiB was enough here).
    done = run_bounded(str(path), 96, [f"data.validation_path={validation}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"train": 40, "val": 1}  # the 8 long rows dropped


def test_a_hundred_thousand_tiny_rows_stay_within_64_mib(tmp_path):
    path = tmp_path / "tiny.jsonl"
    with open(path, "w") as f:
        f.writelines(f'{{"prompt": "{i % 97}+{i % 89}", "expected_answer": "{i % 97 + i % 89}"}}\n' for i in range(100_000))
    done = run_bounded(str(path), 64, ["model.use_chat_template=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"train": 99_800, "val": 128}
