"""``posttrain view``: the samples of one step in the terminal, group after group, each token's
background coloured by engine/trainer mismatch or by entropy (256-colour ANSI). Without ANSI
(not a terminal, or NO_COLOR set) the text is plain and each sample's header still gives its
largest mismatch and mean entropy."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from posttrain.report.tokens import legend, sample_tokens, samples_at_step, summary, visible

# xterm-256 backgrounds, light to strong; the strong ones get white text.
_RAMPS = {"mismatch": (224, 217, 210, 203, 196), "entropy": (195, 153, 111, 69, 27)}
_RESET = "\x1b[0m"


def use_ansi(stream: TextIO) -> bool:
    """ANSI colours on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def render_samples(samples: list[dict], step: int | None = None, mode: str = "mismatch", ansi: bool = True,
                   width: int = 100) -> str:
    """The text of the view of ``step`` (None: the last step with samples)."""
    step, groups = samples_at_step(samples, step)
    first = groups[0][0]
    count = sum(len(g) for g in groups)
    lines = [_bold(f"step {step}", ansi) + f" · policy version {first.get('version', '?')} · {count} samples "
             f"in {len(groups)} groups", legend(mode) if ansi else "(plain text: run in a terminal for colours)", ""]
    for number, group in enumerate(groups):
        prompt = visible(str(group[0].get("prompt", ""))).replace("\n", " ")
        lines.append(_bold(f"── group {number} ", ansi) + "── " + _clip(prompt, width))
        rewards = [s.get("reward") for s in group]
        if all(isinstance(r, (int, float)) for r in rewards):
            lines.append(f"   rewards {' '.join(f'{r:.3g}' for r in rewards)}")
        for sample in group:
            lines.append(f"  [{sample.get('index', '?')}] {summary(sample)}")
            lines.append(_indent(_colour_tokens(sample, mode, ansi), "      "))
        lines.append("")
    return "\n".join(lines)


def print_samples(samples: list[dict], step: int | None, mode: str, stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stdout
    print(render_samples(samples, step, mode, ansi=use_ansi(stream)), file=stream)


def _colour_tokens(sample: dict, mode: str, ansi: bool) -> str:
    tokens = sample_tokens(sample)
    if not tokens:  # no per-token record: the completion text
        return visible(str(sample.get("completion", "")))
    if not ansi:
        return "".join(visible(t.text) for t in tokens)
    ramp = _RAMPS[mode]
    out = []
    for token in tokens:
        text = visible(token.text)
        if not token.is_model_token:
            out.append(_wrap(text, "\x1b[2m"))  # dim: observations are not the model's
            continue
        level = token.intensity(mode)
        if level <= 0:
            out.append(text)
            continue
        index = min(len(ramp) - 1, int(level * len(ramp)))
        foreground = 97 if index >= len(ramp) - 2 else 30
        out.append(_wrap(text, f"\x1b[48;5;{ramp[index]}m\x1b[{foreground}m"))
    return "".join(out)


def _wrap(text: str, code: str) -> str:
    # Reset before each newline: a background left on would colour the rest of the terminal line.
    return "\n".join(f"{code}{part}{_RESET}" if part else "" for part in text.split("\n"))


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def _bold(text: str, ansi: bool) -> str:
    return f"\x1b[1m{text}{_RESET}" if ansi else text


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
