"""Calculator tool use: a multi-turn example environment (train with ``rollout.max_turns > 1``).

The model may write ``<calc>EXPR</calc>``; the environment evaluates EXPR with a small,
AST-walking arithmetic evaluator (never ``eval``) and answers ``<result>VALUE</result>`` (or
``<result>error: ...</result>``), without ending the episode; ``</calc>`` is the next turn's stop
string, so generation stops right after a call. A response without a tool call is the final
answer: it is checked against ``metadata["expected_answer"]`` as the math environment does
(``extract_answer`` / ``answers_match``, so a numeric answer must be a number, not the expression:
the tool is there to compute it) and the episode ends with reward 1.0 (correct) or 0.0.
Tool calls earn nothing by themselves.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Callable

import torch

from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.envs.math_env import EXTRACTION_MODES, answers_match, extract_answer
from posttrain.errors import ConfigError

CALC_STOP = "</calc>"
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e15  # every intermediate value must stay within this (in absolute value)
MAX_EXPONENT = 64

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate (the message says why)."""


def evaluate(expression: str) -> int | float:
    """Value of an arithmetic expression of numbers, parentheses and + - * / // % **.

    Names, calls, attributes, strings and everything else are rejected; so are expressions longer
    than MAX_EXPRESSION_CHARS, exponents above MAX_EXPONENT, and values beyond MAX_MAGNITUDE
    (checked before each power and after each step, so nothing huge is ever computed)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression ({e.msg})") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {right} larger than {MAX_EXPONENT}")
            if left != 0 and abs(right) * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                raise CalculatorError("result too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except (OverflowError, ValueError) as e:
            raise CalculatorError(str(e)) from None
        if isinstance(value, complex):
            raise CalculatorError("complex result")
        return _bounded(value)
    raise CalculatorError(f"{type(node).__name__} is not allowed (only numbers, parentheses and + - * / // % **)")


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("result too large")
    return value


def format_value(value: int | float) -> str:
    """'5' for 5 and 5.0, '0.3333333333' for 1/3."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def _last_assistant(message_log: MessageLog) -> str:
    for message in reversed(message_log):
        if message.get("role") == "assistant":
            return message.get("content") if isinstance(message.get("content"), str) else ""
    return ""


class CalculatorEnvironment(Environment):
    """Tool call -> ``<result>VALUE</result>`` observation (role ``observation_role``), reward 0,
    not terminated; no tool call -> final answer scored against ``expected_answer``, terminated."""

    required_metadata = ("expected_answer",)

    def __init__(self, answer_extraction: str = "lenient", observation_role: str = "tool") -> None:
        if answer_extraction not in EXTRACTION_MODES:
            raise ConfigError(f"env.kwargs.answer_extraction={answer_extraction!r} is not one of 'boxed', 'lenient'.")
        self.answer_extraction = "lenient" if answer_extraction == "lenient" else "boxed"
        self.observation_role = observation_role

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        observations, out_meta, stops, rewards, terminated, answers = [], [], [], [], [], []
        for log, meta in zip(message_log_batch, metadata, strict=True):
            text = _last_assistant(log)
            calls = _CALL.findall(text)
            tool_calls = int(meta.get("tool_calls", 0))
            if calls:
                try:
                    result = format_value(evaluate(calls[-1]))
                except CalculatorError as e:
                    result = f"error: {e}"
                observations.append({"role": self.observation_role, "content": f"<result>{result}</result>"})
                out_meta.append({**meta, "tool_calls": tool_calls + 1})
                stops.append([CALC_STOP])
                rewards.append(0.0)
                terminated.append(False)
                answers.append(None)
                continue
            predicted = extract_answer(text, self.answer_extraction)
            correct = predicted is not None and answers_match(meta["expected_answer"], predicted)
            observations.append({"role": self.observation_role, "content": "correct" if correct else "incorrect"})
            out_meta.append({**meta, "tool_calls": tool_calls, "correct": correct})
            stops.append(None)
            rewards.append(1.0 if correct else 0.0)
            terminated.append(True)
            answers.append(predicted)
        return EnvironmentReturn(
            observations=observations,
            metadata=out_meta,
            next_stop_strings=stops,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminateds=torch.tensor(terminated, dtype=torch.bool),
            answers=answers,
        )

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """accuracy (final answers correct) and tool_calls_mean per episode."""
        metadata = [m if isinstance(m, dict) else {} for m in batch.get("metadata") or []]
        if not metadata:
            return batch, {}
        n = len(metadata)
        return batch, {
            "accuracy": sum(bool(m.get("correct")) for m in metadata) / n,
            "tool_calls_mean": sum(int(m.get("tool_calls", 0)) for m in metadata) / n,
        }
