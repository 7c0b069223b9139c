"""The calculator tool environment: the safe evaluator and the step of a tool call vs a final answer."""

from __future__ import annotations

import pytest

from posttrain.envs.calculator_env import CalculatorEnvironment, CalculatorError, evaluate, format_value
from posttrain.envs.registry import resolve_env_class


@pytest.mark.parametrize("expr, value", [
    ("2+3", 5), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("7 % 3", 1),
    ("2 ** 10", 1024), ("-3 + +4", 1), ("1.5 * 2", 3.0), ("2 ** -1", 0.5),
])
def test_evaluate_values(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", [
    "x + 1", "abs(-3)", "__import__('os')", "(1).real", "'a' * 3", "[1, 2]", "True + 1", "2 ** 1000",
    "10 ** 20", "9 ** 9 ** 9", "1 / 0", "5 % 0", "1 +", "2" * 300, "lambda: 1",
])
def test_evaluate_rejects(expr):
    with pytest.raises(CalculatorError):
        evaluate(expr)


def test_format_value():
    assert format_value(5.0) == "5" and format_value(7) == "7" and format_value(1 / 3) == "0.3333333333"


def test_registered_as_calculator():
    assert resolve_env_class("calculator") is CalculatorEnvironment


def test_step_tool_call_vs_final_answer():
    env = CalculatorEnvironment()
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    logs = [
        prompt + [{"role": "assistant", "content": "let me see <calc>2+3</calc>"}],
        prompt + [{"role": "assistant", "content": "<calc>2**999</calc>"}],
        prompt + [{"role": "assistant", "content": "The answer is 5"}],
        prompt + [{"role": "assistant", "content": "The answer is 6"}],
    ]
    ret = env.step(logs, [{"expected_answer": "5"}] * 4)
    assert ret.terminateds.tolist() == [False, False, True, True]
    assert ret.rewards.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert ret.observations[0] == {"role": "tool", "content": "<result>5</result>"}
    assert ret.observations[1]["content"].startswith("<result>error:")
    assert ret.next_stop_strings[:2] == [["</calc>"], ["</calc>"]]
    assert ret.metadata[0]["tool_calls"] == 1 and ret.metadata[2]["correct"] is True
    _, metrics = env.global_post_process_and_metrics({"metadata": ret.metadata})
    assert metrics["accuracy"] == 0.25 and metrics["tool_calls_mean"] == 0.5
