"""The unit of prompt data shared by every loader: one chat prompt plus its metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The short form is deliberate: small instruct models follow it more reliably than a longer
# "think step by step, then ..." request, and the math environment looks for \boxed{}.
DEFAULT_MATH_INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass
class PromptExample:
    """One training or validation prompt.

    messages: chat messages, usually one ``{"role": "user", "content": ...}``.
    metadata: passed unchanged to the reward environment; holds ``"expected_answer"`` (a str)
        whenever the source has reference answers.
    """

    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
