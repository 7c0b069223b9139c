"""Rollout and validation samples in the run folder, for ``posttrain view`` and ``posttrain report``.

``samples.jsonl``: at step 1, every ``logging.samples_every`` steps and at the last step, up to
``logging.samples_per_write`` completions of the batch trained on (whole groups), one JSON object
each::

    {"step": 10, "version": 9, "engine_version": 9, "group": 0, "index": 1,
     "prompt": "What is 2+3?", "completion": "5", "tokens": ["5", "<|im_end|>"],
     "reward": 1.0, "advantage": 0.87, "finish_reason": "stop", "trainable": true,
     "rollout_logprobs": [-0.41, -0.02], "trainer_logprobs": [-0.40, -0.02], "entropy": [1.32, 0.11],
     "token_versions": [9, 9]}

- ``version``: the policy version (optimizer steps) of the trainer weights the step started with;
  ``engine_version``: the weights the engine generated with (GRPO; lower when sync lags behind).
- ``rollout_logprobs``: the engine's logprob of each sampled token.
- ``token_versions``: the policy version of the weights that sampled each token (the engine's
  ``weight_version``; asynchronous runs count steps, synchronous ones optimizer steps). A
  completion whose weights changed while it was generated (partial rollouts) holds two or more;
  null where the engine does not report them (a remote server).
- ``trainer_logprobs``, ``entropy``: from the first forward pass of the policy update (first
  mini-batch, first epoch, before any optimizer step: the step's starting weights), at the
  sampling temperature; null when the update did not run (PPO's critic warm-up).
- ``tokens``: the text of each completion token (``token_pieces``); ``response_mask`` appears
  for multi-turn episodes (0 on observation tokens).

``validation_samples.jsonl``: every validation prompt, one object each: ``step``, ``prompt``,
``completion``, ``reward``, ``answer`` (what the environment extracted), ``expected``,
``finish_reason``.

Both files are strict JSON (non-finite numbers are written as null). On resume, lines of steps
after the resume step are dropped, as in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from posttrain.config.schema import LoggingConfig
from posttrain.logging.metrics import truncate_jsonl

SAMPLES_FILE = "samples.jsonl"
VALIDATION_SAMPLES_FILE = "validation_samples.jsonl"


class SampleLog:
    """Writes samples.jsonl and validation_samples.jsonl of one run (on rank 0)."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, resume_step: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.every = cfg.samples_every
        self.limit = cfg.samples_per_write
        if resume_step is not None:
            for name in (SAMPLES_FILE, VALIDATION_SAMPLES_FILE):
                truncate_jsonl(self.output_dir / name, resume_step)

    def num_to_record(self, step: int, last_step: int, num_samples: int, first_mini_batch: int,
                      group_size: int) -> int:
        """How many leading samples of this step to write (0: none this step): at most
        ``samples_per_write`` and the first mini-batch, rounded down to whole groups."""
        if self.every <= 0 or self.limit <= 0 or not (step == 1 or step % self.every == 0 or step == last_step):
            return 0
        n = min(self.limit, num_samples, first_mini_batch)
        return n - n % group_size if n >= group_size else n

    def write_rollouts(self, step: int, rollouts: Any, samples: Sequence[Any], tokenizer: Any, group_size: int,
                       version: int, engine_version: int | None = None) -> None:
        """One line per sample; ``rollouts`` (trainer.rollouts.Rollouts) row i is ``samples[i]``."""
        records = []
        for i, s in enumerate(samples):
            prompt, completion = rollouts.prompts[i], rollouts.completions[i]
            advantage = s.advantage if isinstance(s.advantage, (int, float)) else _mean(s.advantage)
            record = {
                "step": step, "version": version, "engine_version": engine_version,
                "group": i // group_size, "index": i % group_size,
                "prompt": _prompt_text(prompt), "completion": completion.text,
                "tokens": token_pieces(tokenizer, s.response_ids),
                "reward": float(rollouts.rewards[i]), "advantage": advantage,
                "finish_reason": getattr(completion, "finish_reason", None), "trainable": bool(s.trainable),
                # After recompute_old_logprobs the engine's logprobs are kept as rollout_logprobs.
                "rollout_logprobs": s.rollout_logprobs if s.rollout_logprobs is not None else s.old_logprobs,
                "trainer_logprobs": s.trainer_logprobs, "entropy": s.entropy,
                "token_versions": _token_versions(completion),
            }
            if s.response_mask is not None:
                record["response_mask"] = list(s.response_mask)
            records.append(record)
        _append(self.output_dir / SAMPLES_FILE, records)

    def write_validation(self, step: int, records: Iterable[dict]) -> None:
        _append(self.output_dir / VALIDATION_SAMPLES_FILE, ({"step": step, **r} for r in records))


def _token_versions(completion: Any) -> list[int] | None:
    versions = getattr(completion, "token_versions", None)
    return [int(v) for v in versions] if versions is not None else None


def token_pieces(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The text of each token, such that ``"".join(pieces) == tokenizer.decode(token_ids)``.

    Each token is decoded with up to three tokens of left context, because SentencePiece
    tokenizers drop the leading space of a decode's first token; a character split over several
    byte tokens is given to the last of them (the others get ""). Two short decodes per token."""
    ids = list(token_ids)
    pieces: list[str] = []
    start = 0  # the first token whose text is not emitted yet
    for i in range(len(ids)):
        context = max(0, start - 3)
        before = tokenizer.decode(ids[context:start])
        text = tokenizer.decode(ids[context : i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # part of a character: its text comes with the next token
            continue
        pieces.append(text[len(before):])
        start = i + 1
    return pieces


def _prompt_text(prompt: Any) -> str:
    messages = getattr(prompt, "messages", None)
    if messages:
        return str(messages[-1].get("content", ""))
    return str(getattr(prompt, "text", ""))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _finite(value: Any) -> Any:
    """Strict JSON: non-finite floats become None, floats keep 6 significant digits (enough for
    logprob differences of 1e-5, and a third of the file size)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _append(path: Path, records: Iterable[dict]) -> None:
    # Opened per write: writes are rare (every samples_every steps), and nothing stays open on a crash.
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_finite(record), allow_nan=False, ensure_ascii=False) + "\n")
