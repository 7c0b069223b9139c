"""A custom reward environment for posttrain: Celsius-to-Fahrenheit conversion.

This file is what a user writes to train on their own task. It only has to be importable: put
its folder on PYTHONPATH and point ``env.cls`` at the class::

    PYTHONPATH=examples/weather_env posttrain grpo data.task=prompts data.train_path=weather.jsonl \\
        env.cls=weather_env.CelsiusToFahrenheitEnv env.kwargs.tolerance=0.5

How posttrain uses it:

* The trainer reads ``required_metadata`` right after loading the data and stops with a clear
  error if a row lacks one of those keys.
* Each reward worker process imports this module and builds ``CelsiusToFahrenheitEnv(**env.kwargs)``
  once; ``step`` is then called with the model's responses (one sample per call in practice,
  but it must accept a batch).
* Once per training step the trainer calls ``global_post_process_and_metrics`` on the whole
  batch, in its own process, to compute the metrics logged as ``reward/<name>``.

Nothing here imports more than posttrain, torch and the standard library, so workers start fast.
"""

from __future__ import annotations

import math
import re
from typing import Any


from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.errors import ConfigError

# A plain decimal number as models write it: "-40", "68", "73.4", "+5".
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def celsius_to_fahrenheit(celsius: float) -> float:
    """The reference conversion, F = C * 9/5 + 32."""
    return celsius * 9.0 / 5.0 + 32.0


def extract_number(text: str) -> float | None:
    """The last number in a response ("It is about 68.0 degrees F." -> 68.0), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1])
    except ValueError:
        return None


def _response_text(message_log: MessageLog) -> str:
    """Content of the last assistant message of a conversation ('' when there is none)."""
    for message in reversed(message_log):
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


class CelsiusToFahrenheitEnv(Environment):
    """Reward 1.0 when the response's last number is within ``tolerance`` degrees Fahrenheit of
    the reference answer, else 0.0.

    Data: one JSONL row per prompt, e.g. ``{"prompt": "...", "celsius": 20, "expected_answer": 68}``
    (``make_data.py`` writes such rows). Every column except the prompt reaches ``step`` as
    per-sample metadata; the answer column (``data.answer_column``, default
    ``expected_answer``) arrives as the string ``metadata["expected_answer"]``.
    """

    #: Keys every prompt row's metadata must have. The trainer checks them before training, so
    #: a data file without answers fails at once instead of training on all-zero rewards.
    required_metadata = ("expected_answer",)

    def __init__(self, tolerance: float = 0.5) -> None:
        """Arguments come from ``env.kwargs`` in the config (``env.kwargs.tolerance=0.5``).

        Validate them here and raise ConfigError with the fix: the trainer checks the argument
        names before loading the model, and the reward workers build the environment before
        the first step, so a bad value fails fast.
        """
        try:
            tolerance = float(tolerance)
        except (TypeError, ValueError):
            raise ConfigError(f"env.kwargs.tolerance={tolerance!r} must be a number of degrees, e.g. 0.5.") from None
        if not math.isfinite(tolerance) or tolerance < 0:
            raise ConfigError(f"env.kwargs.tolerance={tolerance!r} must be a finite number >= 0, e.g. 0.5.")
        self.tolerance = tolerance

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        """Score B conversations.

        message_log_batch: B conversations, each a list of ``{"role", "content"}`` messages
            ending with the model's response (role "assistant").
        metadata: B dicts, the prompt rows' metadata.

        Returns an EnvironmentReturn: rewards (B,) float32, terminateds (B,) bool (all True: one
        answer ends the episode), the extracted answers (logged), one observation per sample
        (what a multi-turn environment would show the model next), and per-sample metadata,
        here extended with ``correct`` for ``global_post_process_and_metrics``. An exception
        raised here gives that sample reward 0 and is counted in ``reward/errors``.
        """
        rewards, observations, out_metadata, answers = [], [], [], []
        for message_log, meta in zip(message_log_batch, metadata, strict=True):
            expected = float(meta["expected_answer"])
            predicted = extract_number(_response_text(message_log))
            correct = predicted is not None and abs(predicted - expected) <= self.tolerance
            rewards.append(1.0 if correct else 0.0)
            answers.append(None if predicted is None else f"{predicted:g}")
            observations.append(
                {"role": "environment", "content": "correct" if correct else f"incorrect: expected {expected:g}"}
            )
            out_metadata.append({**meta, "correct": correct, "answered": predicted is not None})
        # ``final``: every episode ends here (single-turn); a multi-turn environment builds an
        # EnvironmentReturn itself with per-sample terminateds and next_stop_strings.
        return EnvironmentReturn.final(rewards, observations=observations, metadata=out_metadata, answers=answers)

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Batch-level metrics, logged as ``reward/accuracy`` and ``reward/answered``.

        ``batch`` holds the whole step's samples: ``rewards`` (N,) tensor and lists ``metadata``
        (as returned by ``step``), ``message_logs`` and ``answers``. The batch may be returned
        modified (e.g. reshaped rewards); this environment returns it unchanged.
        """
        metadata = [m if isinstance(m, dict) else {} for m in batch.get("metadata") or []]
        if not metadata:
            return batch, {}
        n = len(metadata)
        return batch, {
            "accuracy": sum(bool(m.get("correct")) for m in metadata) / n,
            "answered": sum(bool(m.get("answered")) for m in metadata) / n,
        }
