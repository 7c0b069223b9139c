"""samples.jsonl / validation_samples.jsonl writing: which steps, how many, strict JSON, resume,
and the per-token text."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from helpers import make_tokenizer
from posttrain.config.schema import LoggingConfig
from posttrain.logging.samples import SAMPLES_FILE, VALIDATION_SAMPLES_FILE, SampleLog, token_pieces
from posttrain.trainer.samples import Sample


def test_steps_and_counts_written():
    log = SampleLog(".", LoggingConfig(samples_every=10, samples_per_write=16))
    due = [step for step in range(1, 36) if log.num_to_record(step, 35, 64, 64, 8)]
    assert due == [1, 10, 20, 30, 35]  # the first, every 10th and the last step
    assert log.num_to_record(10, 35, 64, 64, 8) == 16
    assert log.num_to_record(10, 35, 64, 12, 8) == 8  # within the first mini-batch, whole groups
    assert log.num_to_record(10, 35, 64, 6, 8) == 6  # a mini-batch smaller than a group: what there is
    assert log.num_to_record(10, 35, 0, 64, 8) == 0  # dynamic sampling kept nothing
    off = SampleLog(".", LoggingConfig(samples_every=0))
    assert not any(off.num_to_record(step, 35, 64, 64, 8) for step in range(1, 36))


def test_records_are_strict_json_and_resume_drops_later_steps(tmp_path):
    tokenizer = make_tokenizer()
    ids = tokenizer("4+1=5")["input_ids"] + [tokenizer.eos_token_id]
    prompt = SimpleNamespace(messages=[{"role": "user", "content": "What is 4+1?"}], token_ids=[5, 6])
    completion = SimpleNamespace(text="4+1=5", finish_reason="stop")
    rollouts = SimpleNamespace(prompts=[prompt, prompt], completions=[completion, completion],
                               rewards=torch.tensor([1.0, 0.0]))
    samples = [Sample([5, 6], ids, [-0.5] * len(ids), [0.5] * len(ids), 1.0), Sample([5, 6], ids, [-1.0] * len(ids), -0.5, 0.0)]
    samples[0].trainer_logprobs = [float("nan")] + [-0.25] * (len(ids) - 1)
    samples[0].entropy = [1.0] * len(ids)
    log = SampleLog(tmp_path, LoggingConfig())
    for step in (1, 2):
        log.write_rollouts(step, rollouts, samples, tokenizer, group_size=2, version=step - 1, engine_version=0)
    log.write_validation(2, [{"prompt": "p", "completion": "c", "reward": float("inf")}])

    lines = (tmp_path / SAMPLES_FILE).read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) for line in lines]
    first = records[0]
    assert first["tokens"] == ["4", "+", "1", "=", "5", "<|im_end|>"]
    assert first["trainer_logprobs"][0] is None and first["trainer_logprobs"][1] == -0.25  # NaN: null
    assert first["advantage"] == 0.5 and records[1]["advantage"] == -0.5 and records[1]["entropy"] is None
    assert (first["group"], first["index"], records[1]["index"]) == (0, 0, 1)
    assert first["reward"] == 1.0 and first["prompt"] == "What is 4+1?" and first["version"] == 0
    assert json.loads((tmp_path / VALIDATION_SAMPLES_FILE).read_text())["reward"] is None

    SampleLog(tmp_path, LoggingConfig(), resume_step=1)  # resumed from step 1's checkpoint
    assert {json.loads(line)["step"] for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()} == {1}
    assert (tmp_path / VALIDATION_SAMPLES_FILE).read_text() == ""


class ByteTokenizer:
    """SentencePiece-like: '▁' marks a space, a decode drops its leading space, and each byte of a
    multi-byte character is a token of its own (decoded alone, an invalid byte is U+FFFD)."""

    def __init__(self, text: str) -> None:
        self.vocab: list[bytes] = []
        for word in text.split(" "):
            self.vocab.append("\u2581".encode() + word[0].encode())  # "▁t": a word's first letter
            self.vocab += [bytes([byte]) for char in word[1:] for byte in char.encode()]
        self.ids = list(range(len(self.vocab)))

    def decode(self, ids):
        text = b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace").replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


def test_token_pieces_join_to_the_decoded_text():
    tokenizer = make_tokenizer()
    ids = tokenizer("x = 12 * 3\n\\boxed{36}")["input_ids"]
    assert "".join(token_pieces(tokenizer, ids)) == tokenizer.decode(ids)

    sentencepiece = ByteTokenizer("the café is naïve")
    pieces = token_pieces(sentencepiece, sentencepiece.ids)
    assert "".join(pieces) == sentencepiece.decode(sentencepiece.ids) == "the café is naïve"
    assert pieces[0] == "t" and " c" in pieces  # the space of a word's first token is kept after the first
    assert "é" in pieces and "" in pieces  # a two-byte character: "" for its first byte, "é" for its last
