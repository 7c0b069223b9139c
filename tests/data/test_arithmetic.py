"""The embedded arithmetic task: determinism, level ranges, correct answers, disjoint splits."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from posttrain.config.schema import ArithmeticConfig
from posttrain.data import generate_arithmetic_problems, make_arithmetic_splits
from posttrain.errors import PosttrainError

SIMPLE = re.compile(r"^What is (\d+) ([+\-*]) (\d+)\?$")


def question(ex) -> str:
    return ex.messages[0]["content"]


def test_deterministic_for_seed():
    a = generate_arithmetic_problems(300, 5, seed=3)
    b = generate_arithmetic_problems(300, 5, seed=3)
    c = generate_arithmetic_problems(300, 5, seed=4)
    assert a == b
    assert [question(x) for x in a] != [question(x) for x in c]


def test_does_not_touch_global_rng():
    import random

    random.seed(0)
    expected = random.random()
    random.seed(0)
    generate_arithmetic_problems(100, 5, seed=1)
    assert random.random() == expected


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_levels_even_and_metadata(difficulty):
    problems = generate_arithmetic_problems(100 * difficulty, difficulty, seed=0)
    counts = Counter(p.metadata["level"] for p in problems)
    assert counts == {lvl: 100 for lvl in range(1, difficulty + 1)}
    for p in problems:
        assert p.messages[0]["role"] == "user" and len(p.messages) == 1
        assert p.metadata["task"] == "arithmetic"
        answer = p.metadata["expected_answer"]
        assert isinstance(answer, str) and answer.isdigit()  # a non-negative integer


def test_levels_1_and_2_answers_and_ranges():
    for p in generate_arithmetic_problems(4000, 2, seed=5):
        a, op, b = SIMPLE.match(question(p)).groups()
        a, b = int(a), int(b)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.metadata["expected_answer"] == str(value) and value >= 0
        if p.metadata["level"] == 1:
            assert op in "+-" and 0 <= b <= a <= 9
        elif op == "*":
            assert 1 <= a <= 9 and 1 <= b <= 9
        else:
            assert 10 <= a <= 99 and 1 <= b <= 9
    ops = Counter(SIMPLE.match(question(p)).group(2) for p in generate_arithmetic_problems(3000, 2, seed=1) if p.metadata["level"] == 2)
    assert set(ops) == {"+", "-", "*"}


def test_word_problem_levels_vary_and_scale():
    problems = generate_arithmetic_problems(3000, 5, seed=2)
    by_level = {lvl: [p for p in problems if p.metadata["level"] == lvl] for lvl in (3, 4, 5)}
    for lvl, ps in by_level.items():
        assert all(not SIMPLE.match(question(p)) for p in ps)
        # Many distinct sentence shapes: mask numbers and names, count what is left.
        shapes = {re.sub(r"\d+", "N", question(p)).split(".")[-1] for p in ps}
        assert len(shapes) >= 7, (lvl, len(shapes))
    numbers = lambda ps: max(int(n) for p in ps for n in re.findall(r"\d+", question(p)))  # noqa: E731
    assert numbers(by_level[3]) <= 60
    assert numbers(by_level[5]) >= 200


def test_difficulty_validated():
    for bad in (0, 6, True):
        with pytest.raises(PosttrainError, match="difficulty must be an integer from 1 to 5"):
            generate_arithmetic_problems(10, bad, seed=0)
    with pytest.raises(PosttrainError, match="data.arithmetic.difficulty"):
        make_arithmetic_splits(ArithmeticConfig(difficulty=9))


def test_splits_disjoint_and_deterministic():
    cfg = ArithmeticConfig(difficulty=3, num_train=5000, num_validation=200, seed=11)
    train, val = make_arithmetic_splits(cfg)
    assert len(train) == 5000 and len(val) == 200
    val_questions = [question(p) for p in val]
    assert len(set(val_questions)) == 200  # validation has no repeats
    assert set(val_questions).isdisjoint(question(p) for p in train)
    # Every level is still represented in validation (small levels capped, not dropped).
    assert set(Counter(p.metadata["level"] for p in val)) == {1, 2, 3}
    assert make_arithmetic_splits(cfg) == (train, val)
    other = make_arithmetic_splits(ArithmeticConfig(difficulty=3, num_train=5000, num_validation=200, seed=12))
    assert [question(p) for p in other[1]] != val_questions


def test_validation_too_large_for_small_levels():
    with pytest.raises(PosttrainError, match="num_validation=200.*at most 26.*raise data.arithmetic.difficulty"):
        make_arithmetic_splits(ArithmeticConfig(difficulty=1, num_validation=200))
    train, val = make_arithmetic_splits(ArithmeticConfig(difficulty=1, num_train=500, num_validation=20))
    assert len(val) == 20 and set(map(question, val)).isdisjoint(map(question, train))


def test_fast():
    start = time.perf_counter()
    make_arithmetic_splits(ArithmeticConfig(difficulty=5, num_train=20000, num_validation=200))
    assert time.perf_counter() - start < 2.0
