from __future__ import annotations

import pytest
import torch

from posttrain.envs.math_env import MathEnvironment, extract_answer, last_boxed
from posttrain.errors import ConfigError, PosttrainError


def conv(response: str) -> list[dict]:
    return [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": response}]


def score(env: MathEnvironment, response: str, gold) -> tuple[float, dict, str | None]:
    ret = env.step([conv(response)], [{"expected_answer": gold, "id": 7}])
    return float(ret.rewards[0]), ret.metadata[0], ret.answers[0]


CORRECT = [
    ("So the answer is \\boxed{72}.", "72"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "1/2"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{3} then \\boxed{{2}^{3}}", "2^3"),  # an expression as reference: expressions count
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{72.0}", 72),
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18}", "$18"),
    ("\\boxed{-4}", "-4"),
    ("\\boxed{0.5}", 0.5),
]


@pytest.mark.parametrize("response,gold", CORRECT)
def test_boxed_answers_correct(response, gold):
    reward, meta, _ = score(MathEnvironment(), response, gold)
    assert reward == pytest.approx(1.1)
    assert meta["correct"] is True and meta["formatted"] is True and meta["id"] == 7


@pytest.mark.parametrize(
    "response,gold,answer",
    [
        ("reasoning...\n#### 72", "72", "72"),
        ("#### 1,000", "1000", "1000"),
        ("The answer is 1,000.", "1000", "1000"),
        ("Answer: $18", "18", "18"),
        ("The final answer is $\\frac{3}{4}$.", "0.75", "\\frac{3}{4}"),
        ("The answer is 42. I hope this helps.", "42", "42"),
        ("she is left with -5 apples", "-5", "-5"),
        ("10-3=7, so seven", "7", "7"),
        ("It costs 3.5 dollars", "7/2", "3.5"),
    ],
)
def test_unboxed_answers_lenient(response, gold, answer):
    reward, meta, extracted = score(MathEnvironment(), response, gold)
    assert extracted == answer
    assert reward == pytest.approx(1.0)  # correct, but no \boxed{} format bonus
    assert meta == {"expected_answer": gold, "id": 7, "correct": True, "formatted": False, "expression": False}


def test_strict_mode_reads_only_boxed_and_hash():
    env = MathEnvironment(answer_extraction="boxed")
    assert score(env, "The answer is 72.", "72")[:1] == (0.0,)
    assert score(env, "so 72", "72")[2] is None
    assert score(env, "#### 72", "72")[0] == 1.0
    assert score(env, "\\boxed{72}", "72")[0] == pytest.approx(1.1)
    assert MathEnvironment(answer_extraction="strict").answer_extraction == "boxed"


@pytest.mark.parametrize(
    "response,gold,reward",
    [
        ("\\boxed{71}", "72", 0.1),  # wrong but well formatted
        ("\\boxed{-4}", "4", 0.1),
        ("I think it is 71", "72", 0.0),
        ("I do not know.", "72", 0.0),
        ("", "72", 0.0),
        ("\\boxed{}", "72", 0.0),
        ("\\boxed{72", "72", 1.0),  # unbalanced: not a boxed answer; lenient last number
    ],
)
def test_wrong_or_missing_answers(response, gold, reward):
    assert score(MathEnvironment(), response, gold)[0] == pytest.approx(reward)


def test_batch_outputs_and_format_reward():
    env = MathEnvironment(format_reward=0.5)
    logs = [conv("\\boxed{2}"), conv("\\boxed{3}"), conv("it is 2"), [{"role": "user", "content": "hi"}]]
    meta = [{"expected_answer": "2"}] * 4
    ret = env.step(logs, meta)
    assert torch.allclose(ret.rewards, torch.tensor([1.5, 0.5, 1.0, 0.0]))
    assert ret.rewards.dtype == torch.float32
    assert ret.terminateds.dtype == torch.bool and ret.terminateds.all()
    assert ret.answers == ["2", "3", "2", None]
    assert ret.next_stop_strings == [None] * 4
    assert ret.observations[0] == {"role": "environment", "content": "correct"}
    assert ret.observations[1] == {"role": "environment", "content": "incorrect: expected 2"}
    assert meta[0] == {"expected_answer": "2"}  # input metadata is not modified

    _, metrics = env.global_post_process_and_metrics({"rewards": ret.rewards, "metadata": ret.metadata})
    assert metrics == {"accuracy": 0.5, "format_rate": 0.5, "expression_answer_rate": 0.0}


@pytest.mark.parametrize("response", ["\\boxed{47 \\times 83}", "\\boxed{47*83}", "The answer is \\boxed{83 \\cdot 47}",
                                      "\\boxed{3900 + 1}", "#### 47*83", "\\boxed{{2}^{3} \\cdot 487 + 5}"])
def test_an_expression_equal_to_a_numeric_answer_is_refused(response):
    """math-verify evaluates expressions, so copying the problem "What is 47 * 83?" into the box
    would be scored correct: a reward hack a policy finds. A number as reference needs a number."""
    env = MathEnvironment()
    reward, meta, _ = score(env, response, "3901")
    assert meta["correct"] is False and meta["expression"] is True
    assert reward == pytest.approx(0.1 if "boxed" in response else 0.0)  # the format bonus only
    _, metrics = env.global_post_process_and_metrics({"metadata": [meta, score(env, "\\boxed{3901}", "3901")[1]]})
    assert metrics["expression_answer_rate"] == 0.5 and metrics["accuracy"] == 0.5
    # Opting out scores it as math-verify does.
    assert score(MathEnvironment(literal_answers=False), response, "3901")[1]["correct"] is True


@pytest.mark.parametrize("response,gold", [("\\boxed{x = 3901}", "3901"), ("\\boxed{3,901.0}", "3901"),
                                           ("\\boxed{50\\%}", "50%"), ("\\boxed{-\\frac{1}{2}}", "-0.5"),
                                           ("\\boxed{18 \\text{ dollars}}", "18"), ("\\boxed{18\\,\\text{cm}}", "18"),
                                           ("\\boxed{\\text{18}}", "18"), ("\\boxed{90^{\\circ}}", "90")])
def test_numbers_written_in_other_ways_still_count(response, gold):
    assert score(MathEnvironment(), response, gold)[1]["correct"] is True


def test_missing_expected_answer_names_the_column():
    with pytest.raises(PosttrainError, match="data.answer_column"):
        MathEnvironment().step([conv("\\boxed{1}")], [{"question": "q"}])


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="answer_extraction"):
        MathEnvironment(answer_extraction="fuzzy")
    with pytest.raises(ConfigError, match="format_reward"):
        MathEnvironment(format_reward="lots")
    with pytest.raises(ConfigError, match="literal_answers"):
        MathEnvironment(literal_answers="yes")


def test_last_boxed_nested_and_extract():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} and \\boxed{2}") == "2"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert extract_answer("no answer here") is None


def test_unfilled_box_falls_back_to_last_number_in_lenient_mode():
    from posttrain.envs.math_env import extract_answer

    text = "6 * 7 = 42 cookies.\n\nThe answer is \\boxed"
    assert extract_answer(text, "lenient") == "42"
    assert extract_answer(text, "boxed") is None
    assert extract_answer("The answer is: 12.", "lenient") == "12"
