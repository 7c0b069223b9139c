"""Math environment: reward 1 for a final answer equal to the reference (checked with math-verify).

The answer is taken from the response in this order: the last ``\\boxed{...}``, else a
``#### X`` line (GSM8K style), and in "lenient" mode also an "Answer: X" / "answer is X"
phrase, else the last number in the text. Equivalence is mathematical (0.5 == 1/2 ==
\\frac{1}{2}, 1,000 == 1000, 72.0 == 72, $18 == 18), decided by math-verify.

When the reference answer is a number, the answer must be one too (``literal_answers``, on by
default): math-verify evaluates expressions, so ``\\boxed{47 \\times 83}`` equals 3901, and a
policy learns to copy the problem into the box instead of computing it (reward hacking).
"""

from __future__ import annotations

import logging
import re
from typing import Any


from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.errors import ConfigError, PosttrainError

# "strict" is accepted as an alias of "boxed" (only explicit final-answer markers count).
EXTRACTION_MODES = ("boxed", "lenient", "strict")

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")
# The phrase must be followed by something number-like: "the answer is \boxed" (a truncated or
# unfilled box) is no answer, and the last-number fallback should get its chance.
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\s*:?|:)\s*((?:\$|-\s?)?(?:\d|\\d?frac)[^\n]*)", re.IGNORECASE)
# A number not glued to a preceding word/digit (so '10-3' yields '3', 'x=-3' yields '-3').
_NUMBER = re.compile(r"(?<![\w.])(?:-\s?)?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_NUMBER_WITH_WORDS = re.compile(r"(-?\d+(?:\.\d+)?(?:/\d+)?)\s+[A-Za-z]{2,}[A-Za-z .]*")
_THOUSANDS_SEP = re.compile(r"(?<=\d)(?:,|\\,)(?=\d{3}(?!\d))")
# A number written out: 3901, -7, 3.5, .5, 1/2, 50%, \frac{1}{2} (what an answer to "What is 47 * 83?" must be).
_LITERAL_NUMBER = re.compile(r"-?\s?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?\s*(?:\\?%)?|-?\\[dt]?frac\{\d+\}\{\d+\}")
_ASSIGNMENT = re.compile(r"[A-Za-z]\w*\s*=\s*(.+)")  # 'x = 42': the value is the answer
# Around a number, not part of its value: '18 \text{ dollars}', '18\,\text{cm}', '\text{18}', '90^{\circ}'.
_TEXT_MACRO = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here the reward pool
    enforces a per-sample timeout instead, so the warning would only be noise in every worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` in text (nested braces allowed), or None."""
    for match in reversed(list(_BOXED_START.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:i].strip()
                    if content:
                        return content
                    break
        # Unbalanced (e.g. a truncated response) or empty: try an earlier \boxed.
    return None


def clean_answer(answer: str) -> str:
    """Strip the decoration around an answer that is not part of its value."""
    s = answer.strip()
    # Cut the sentence that follows an answer phrase ('42. I hope this helps.') but keep decimals.
    s = re.split(r"\.(?=\s|$)", s, maxsplit=1)[0].strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").strip()
    s = _THOUSANDS_SEP.sub("", s)
    # '18 dollars' / '3.5 apples' -> the number; '5x' or '2\pi' are kept as they are.
    m = _NUMBER_WITH_WORDS.fullmatch(s)
    if m:
        s = m.group(1)
    return s.rstrip(".,;: ").strip()


def extract_answer(response: str, mode: str = "lenient") -> str | None:
    """The predicted final answer of a response (cleaned), or None if there is none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return clean_answer(boxed) or None
    candidates: list[str] = [m.group(1) for m in _HASH_ANSWER.finditer(response)]
    if not candidates and mode == "lenient":
        candidates = [m.group(1) for m in _ANSWER_PHRASE.finditer(response)]
        if not candidates:
            candidates = [m.group(0).replace(" ", "") for m in _NUMBER.finditer(response)]
    for candidate in reversed(candidates):
        cleaned = clean_answer(candidate)
        if cleaned:
            return cleaned
    return None


def is_literal_number(text: str) -> bool:
    """Whether ``text`` is a number written out (not an expression to evaluate)."""
    return _LITERAL_NUMBER.fullmatch(text.strip()) is not None


def _number_part(answer: str) -> str:
    """``answer`` without what surrounds a number: 'x =', units in words or ``\\text{}``, LaTeX
    spacing and degree signs ('x = 18 \\text{ cm}' -> '18')."""
    assignment = _ASSIGNMENT.fullmatch(answer.strip())
    s = assignment.group(1) if assignment else answer
    s = _TEXT_MACRO.sub(lambda m: f" {m.group(1)} ", s)
    s = " ".join(_DEGREES.sub("", _SPACING.sub(" ", s)).split())
    words = _NUMBER_WITH_WORDS.fullmatch(s)
    return words.group(1) if words else s


def answers_match(gold: Any, predicted: str, literal: bool = True) -> bool:
    """Whether the predicted answer is mathematically equal to the gold answer. ``literal``: a
    number as gold needs a number as the answer, not an expression equal to it."""
    from math_verify import parse, verify  # deferred: sympy takes ~1 s to import

    gold_text = clean_answer(str(gold))
    if not gold_text or not predicted:
        return False
    if literal and is_literal_number(gold_text):
        predicted = _number_part(predicted)
        if not is_literal_number(predicted):
            return False
    # Bare numbers and LaTeX are wrapped in \boxed{} so math-verify's LaTeX extractor reads them.
    # Timeouts are disabled (None): math-verify's use signal.alarm, which fails off the main
    # thread; the reward pool kills a worker whose sample takes too long instead.
    gold_parsed = parse(f"\\boxed{{{gold_text}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    if gold_parsed and pred_parsed:
        if verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    # Answers math-verify cannot parse (words, names) are compared as normalised text.
    return _plain(gold_text) == _plain(predicted)


def _plain(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text).casefold()


def _response_text(message_log: MessageLog) -> str:
    """Content of the last assistant message ('' when there is none)."""
    for message in reversed(message_log):
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


class MathEnvironment(Environment):
    """Single-turn math answers checked against ``metadata["expected_answer"]``.

    Reward: 1.0 for a correct answer (else 0.0), plus ``format_reward`` when the response puts
    its answer in ``\\boxed{}`` (the format the prompts ask for); at most 1 + format_reward.
    ``literal_answers``: a number as reference needs a number as the answer; an expression equal
    to it (the problem copied into the box) scores 0 and counts in ``expression_answer_rate``.
    """

    required_metadata = ("expected_answer",)

    def __init__(self, format_reward: float = 0.1, answer_extraction: str = "lenient",
                 literal_answers: bool = True) -> None:
        if answer_extraction not in EXTRACTION_MODES:
            raise ConfigError(
                f"env.kwargs.answer_extraction={answer_extraction!r} is not one of 'boxed', 'lenient'. "
                "'boxed' reads only \\boxed{} and '#### X' answers; 'lenient' also 'Answer: X' "
                "phrases and the last number."
            )
        try:
            self.format_reward = float(format_reward)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"env.kwargs.format_reward={format_reward!r} must be a number, e.g. 0.1.") from e
        self.answer_extraction = "lenient" if answer_extraction == "lenient" else "boxed"
        if not isinstance(literal_answers, bool):
            raise ConfigError(f"env.kwargs.literal_answers={literal_answers!r} must be true or false.")
        self.literal_answers = literal_answers
        import math_verify  # noqa: F401  (pay sympy's ~1 s import now, not inside a timed sample)

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        """Score B conversations; rewards (B,) float, terminateds (B,) all True."""
        rewards: list[float] = []
        out_meta: list[dict[str, Any] | None] = []
        observations: list[dict[str, Any]] = []
        answers: list[str | None] = []
        for i, (log, meta) in enumerate(zip(message_log_batch, metadata, strict=True)):
            if not isinstance(meta, dict) or meta.get("expected_answer") is None:
                raise PosttrainError(
                    f"sample {i} has no 'expected_answer' in its metadata, which the math environment "
                    "needs as the reference answer. Set data.answer_column to the dataset column "
                    "holding the answers (it is passed to the environment as 'expected_answer')."
                )
            gold = meta["expected_answer"]
            response = _response_text(log)
            predicted = extract_answer(response, self.answer_extraction)
            correct = predicted is not None and answers_match(gold, predicted, self.literal_answers)
            # An expression equal to the reference, refused: the reward hack literal_answers stops.
            expression = (not correct and self.literal_answers and predicted is not None
                          and not is_literal_number(predicted) and answers_match(gold, predicted, literal=False))
            formatted = last_boxed(response) is not None
            rewards.append((1.0 if correct else 0.0) + (self.format_reward if formatted else 0.0))
            out_meta.append({**meta, "correct": correct, "formatted": formatted, "expression": expression})
            observations.append(
                {"role": "environment", "content": "correct" if correct else f"incorrect: expected {gold}"}
            )
            answers.append(predicted)
        return EnvironmentReturn.final(rewards, observations=observations, metadata=out_meta, answers=answers)

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Metrics over the whole batch: accuracy (mean correct) and format_rate (mean boxed)."""
        metadata = [m if isinstance(m, dict) else {} for m in batch.get("metadata") or []]
        if not metadata:
            return batch, {}
        n = len(metadata)
        return batch, {
            "accuracy": sum(bool(m.get("correct")) for m in metadata) / n,
            "format_rate": sum(bool(m.get("formatted")) for m in metadata) / n,
            "expression_answer_rate": sum(bool(m.get("expression")) for m in metadata) / n,
        }
