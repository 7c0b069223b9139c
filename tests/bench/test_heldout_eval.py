"""bench/heldout_eval.py's problems: unseen in training, each answer right, one level per operation,
and scored by the math environment, which refuses the problem copied into the box."""

from pathlib import Path

from helpers import load_script
from posttrain.envs.math_env import MathEnvironment

BENCH = Path(__file__).resolve().parents[2] / "bench" / "heldout_eval.py"


def _bench():
    return load_script(BENCH, "heldout_eval")


def test_problems_are_distinct_correct_and_grouped_by_operation():
    problems = _bench().heldout_problems(300, 1234)
    questions = [p.messages[0]["content"].split("?")[0] + "?" for p in problems]
    assert len(set(questions)) == 300
    env = MathEnvironment()
    for p, q in zip(problems[:60], questions):
        a, op, b = q.removeprefix("What is ").rstrip("?").split()
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert p.metadata["expected_answer"] == str(eval(f"{a}{op}{b}"))  # noqa: S307 - two literals
        assert p.metadata["level"] == {"+": "add", "-": "sub", "*": "mul"}[op]
        meta = {"expected_answer": p.metadata["expected_answer"]}
        right = env.step([[{"role": "assistant", "content": f"\\boxed{{{p.metadata['expected_answer']}}}"}]], [meta])
        copied = env.step([[{"role": "assistant", "content": f"\\boxed{{{a} {op} {b}}}"}]], [meta])
        assert right.metadata[0]["correct"] and not copied.metadata[0]["correct"]
    assert {p.metadata["level"] for p in problems} == {"add", "sub", "mul"}
