"""Per-token values of samples.jsonl records, and their colour intensity, for both views
(terminal in ``terminal.py``, HTML in ``html.py``).

Colour modes:

- ``mismatch``: |trainer logprob - rollout logprob| of each sampled token, on a log scale from
  1e-3 (no colour) to 1 (full colour). Large values are tokens the engine and the trainer
  disagree on: numerics (bf16, kernels), or weights the engine had not received yet.
- ``entropy``: the policy's entropy at each token, linear from 0 to 3 nats (full colour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

COLOR_MODES = ("mismatch", "entropy")
MISMATCH_LOW, MISMATCH_HIGH = 1e-3, 1.0
ENTROPY_FULL = 3.0


@dataclass(frozen=True)
class Token:
    text: str
    rollout_logprob: float | None
    trainer_logprob: float | None
    entropy: float | None
    is_model_token: bool = True  # False: an observation token of a multi-turn episode

    @property
    def mismatch(self) -> float | None:
        if self.rollout_logprob is None or self.trainer_logprob is None:
            return None
        return abs(self.trainer_logprob - self.rollout_logprob)

    def intensity(self, mode: str) -> float:
        """0 (no colour) to 1 (full colour) in colour ``mode``; 0 where the value is unknown."""
        if not self.is_model_token:
            return 0.0
        if mode == "mismatch":
            value = self.mismatch
            if value is None or value <= MISMATCH_LOW:
                return 0.0
            return min(1.0, math.log(value / MISMATCH_LOW) / math.log(MISMATCH_HIGH / MISMATCH_LOW))
        if mode == "entropy":
            return 0.0 if self.entropy is None else max(0.0, min(1.0, self.entropy / ENTROPY_FULL))
        raise ValueError(f"unknown colour mode {mode!r}; choose one of {', '.join(COLOR_MODES)}")

    def describe(self) -> str:
        """The token's values in a line, e.g. for an HTML tooltip."""
        parts = []
        if self.rollout_logprob is not None:
            parts.append(f"rollout {self.rollout_logprob:.4f}")
        if self.trainer_logprob is not None:
            parts.append(f"trainer {self.trainer_logprob:.4f}")
        if self.mismatch is not None:
            parts.append(f"|Δ| {self.mismatch:.1e}")
        if self.entropy is not None:
            parts.append(f"entropy {self.entropy:.3f}")
        if not self.is_model_token:
            parts.append("observation (not trained on)")
        return " · ".join(parts)


def sample_tokens(sample: dict) -> list[Token]:
    """The tokens of one samples.jsonl record with their values (missing lists: None)."""
    pieces = sample.get("tokens") or []
    n = len(pieces)

    def column(name: str) -> list:
        values = sample.get(name)
        return list(values) + [None] * (n - len(values)) if values is not None else [None] * n

    rollout, trainer, entropy = column("rollout_logprobs"), column("trainer_logprobs"), column("entropy")
    mask = sample.get("response_mask") or [1] * n
    return [Token(pieces[i], rollout[i], trainer[i], entropy[i], bool(mask[i]) if i < len(mask) else True)
            for i in range(n)]


def samples_at_step(samples: list[dict], step: int | None = None) -> tuple[int, list[list[dict]]]:
    """The samples written at ``step`` (None: the last step with samples) as groups, in order.
    Raises ValueError naming the steps there are."""
    steps = sorted({int(s["step"]) for s in samples})
    if not steps:
        raise ValueError("no samples")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"no samples at step {step}; samples were written at steps {_ranges(steps)}")
    groups: dict[int, list[dict]] = {}
    for s in samples:
        if int(s["step"]) == step:
            groups.setdefault(int(s.get("group", 0)), []).append(s)
    return step, [sorted(g, key=lambda s: s.get("index", 0)) for _, g in sorted(groups.items())]


def summary(sample: dict) -> str:
    """``reward 1.00 · adv +0.87 · stop · 12 tokens · max |diff| 0.003 · mean entropy 1.2``."""
    tokens = [t for t in sample_tokens(sample) if t.is_model_token]
    parts = [f"reward {_num(sample.get('reward'), '.3g')}", f"adv {_num(sample.get('advantage'), '+.3f')}"]
    if sample.get("finish_reason"):
        parts.append(str(sample["finish_reason"]))
    parts.append(f"{len(tokens)} tokens")
    mismatches = [t.mismatch for t in tokens if t.mismatch is not None]
    entropies = [t.entropy for t in tokens if t.entropy is not None]
    if mismatches:
        parts.append(f"max |diff| {max(mismatches):.2g}")
    if entropies:
        parts.append(f"mean entropy {sum(entropies) / len(entropies):.3g}")
    if sample.get("trainable") is False:
        parts.append("not trained on")
    return " · ".join(parts)


def legend(mode: str) -> str:
    if mode == "mismatch":
        return (f"colour: |trainer - rollout logprob| per token, log scale {MISMATCH_LOW:g} (none) to "
                f"{MISMATCH_HIGH:g} (full)")
    return f"colour: policy entropy per token, 0 (none) to {ENTROPY_FULL:g} nats (full)"


def visible(text: str) -> str:
    """Control characters (other than newline and tab) as ``\\xNN``: a random model's tokens would
    otherwise move the terminal's cursor, or vanish in HTML."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def _num(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def _ranges(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:20])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > 20 else "")
