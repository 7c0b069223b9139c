"""Write a randomly initialised Qwen2 model of a real shape, with a tokenizer, to a folder.

For runs that time the system rather than learn (weight sync inside a real GRPO loop, serving)
on a machine that cannot download the real checkpoint. The tokenizer is character-level over
printable ASCII plus filler tokens, so it covers the whole vocabulary of the shape: every id the
random model samples decodes to text. Rewards of such a model are ~0; speed does not depend on
the weight values.

    python bench/random_model.py --shape qwen2.5-0.5b --out /tmp/qwen05-random
    posttrain grpo model.path=/tmp/qwen05-random ...
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_sync import SHAPES  # noqa: E402

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokens = SPECIAL + sorted(set(string.printable))
    tokens += [f"<x{i}>" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", bos_token=None, chat_template=CHATML)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = make_tokenizer(SHAPES[args.shape]["vocab_size"])
    torch.manual_seed(args.seed)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=32768, rope_theta=1000000.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
