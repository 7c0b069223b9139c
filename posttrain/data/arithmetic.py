"""The embedded arithmetic task: procedurally generated problems, no download.

Levels (problems are drawn evenly from levels 1..difficulty):
  1: one-digit a + b and a - b with a >= b;
  2: two-digit +/- one-digit, one-digit x one-digit;
  3: one-step word problems, numbers up to about 50;
  4: two-step word problems;
  5: three-step word problems, numbers up to a few hundred.
Every answer is a non-negative integer. Levels 1-2 are small finite pools; 3-5 are templates
filled with random names, items and numbers so that surface forms do not repeat.
"""

from __future__ import annotations

import random
from typing import Callable, Collection

from posttrain.config.schema import ArithmeticConfig
from posttrain.data.example import PromptExample
from posttrain.errors import PosttrainError

Problem = tuple[str, int]
MAX_LEVEL = 5
# At most this fraction of a finite pool is held out, so training still sees most of it.
MAX_HELD_OUT_FRACTION = 0.25


class _Pool:
    """A finite list of problems drawn uniformly (levels 1-2)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __call__(self, rng: random.Random) -> Problem:
        return self.problems[rng.randrange(len(self.problems))]


_D = range(0, 10)
_POOLS_1 = [
    _Pool([(f"What is {a} + {b}?", a + b) for a in _D for b in _D if a >= b]),
    _Pool([(f"What is {a} - {b}?", a - b) for a in _D for b in _D if a >= b]),
]
_POOLS_2 = [
    _Pool([(f"What is {a} + {b}?", a + b) for a in range(10, 100) for b in range(1, 10)]),
    _Pool([(f"What is {a} - {b}?", a - b) for a in range(10, 100) for b in range(1, 10)]),
    _Pool([(f"What is {a} * {b}?", a * b) for a in range(1, 10) for b in range(1, 10)]),
]

# (name, subject pronoun) pairs; templates capitalise the pronoun where a sentence starts.
NAMES = [
    ("Tom", "he"), ("Maria", "she"), ("Ali", "he"), ("Priya", "she"), ("Ken", "he"), ("Lucy", "she"),
    ("Omar", "he"), ("Sofia", "she"), ("Jack", "he"), ("Mei", "she"), ("Diego", "he"), ("Emma", "she"),
    ("Noah", "he"), ("Aisha", "she"), ("Liam", "he"), ("Hana", "she"), ("Ben", "he"), ("Zara", "she"),
    ("Leo", "he"), ("Nina", "she"), ("Sam", "he"), ("Grace", "she"), ("Ravi", "he"), ("Chloe", "she"),
]
ITEMS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins",
    "balloons", "candies", "toy cars", "flowers", "stamps", "eggs", "oranges", "crayons", "buttons",
]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("basket", "baskets"), ("jar", "jars"), ("tray", "trays")]


def _people(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return rng.sample(NAMES, n)


# ---- level 3: one step, numbers up to about 50 ------------------------------------------------
def _l3_buy(r: random.Random) -> Problem:
    (n, p), item, a, b = _people(r, 1)[0], r.choice(ITEMS), r.randint(5, 50), r.randint(2, 30)
    return f"{n} has {a} {item}. {p.capitalize()} buys {b} more. How many {item} does {p} have now?", a + b

def _l3_given(r: random.Random) -> Problem:
    (n, p), (m, _) = _people(r, 2)
    item, a, b = r.choice(ITEMS), r.randint(3, 40), r.randint(2, 30)
    return f"{n} had {a} {item}. {m} gave {n} {b} more. How many {item} does {n} have now?", a + b

def _l3_together(r: random.Random) -> Problem:
    (n, _), (m, _) = _people(r, 2)
    item, a, b = r.choice(ITEMS), r.randint(2, 50), r.randint(2, 50)
    return f"{n} has {a} {item} and {m} has {b} {item}. How many {item} do they have together?", a + b

def _l3_give_away(r: random.Random) -> Problem:
    (n, p), (m, _) = _people(r, 2)
    item, a = r.choice(ITEMS), r.randint(5, 50)
    b = r.randint(1, a)
    return f"{n} has {a} {item}. {p.capitalize()} gives {b} of them to {m}. How many {item} does {n} have left?", a - b

def _l3_take(r: random.Random) -> Problem:
    (n, _), (c, _) = _people(r, 1)[0], r.choice(CONTAINERS)
    item, a = r.choice(ITEMS), r.randint(5, 50)
    b = r.randint(1, a)
    return f"There are {a} {item} in a {c}. {n} takes {b} of them. How many {item} are left in the {c}?", a - b

def _l3_fewer(r: random.Random) -> Problem:
    (n, _), (m, _) = _people(r, 2)
    item, a = r.choice(ITEMS), r.randint(5, 50)
    b = r.randint(1, a)
    return f"{n} has {a} {item}. {m} has {b} fewer {item} than {n}. How many {item} does {m} have?", a - b

def _l3_share(r: random.Random) -> Problem:
    n, _ = _people(r, 1)[0]
    item, k = r.choice(ITEMS), r.randint(2, 9)
    q = r.randint(1, 50 // k)
    return f"{n} has {k * q} {item} and shares them equally among {k} friends. How many {item} does each friend get?", q

def _l3_groups(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, (_, cs), k, q = r.choice(ITEMS), r.choice(CONTAINERS), r.randint(2, 9), r.randint(2, 12)
    return f"{n} has {k} {cs} with {q} {item} in each. How many {item} does {p} have in total?", k * q

def _l3_daily(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, k, q = r.choice(ITEMS), r.randint(2, 9), r.randint(2, 9)
    return f"{n} collects {q} {item} every day. How many {item} does {p} collect in {k} days?", k * q

def _l3_fill(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, (c, cs), q = r.choice(ITEMS), r.choice(CONTAINERS), r.randint(2, 9)
    k = r.randint(2, 50 // q)
    return f"{n} puts {k * q} {item} into {cs}, {q} in each {c}. How many {cs} does {p} fill?", k


# ---- level 4: two steps ----------------------------------------------------------------------
def _l4_buy_give(r: random.Random) -> Problem:
    (n, p), (m, _) = _people(r, 2)
    item, a, b = r.choice(ITEMS), r.randint(5, 50), r.randint(2, 30)
    c = r.randint(1, a + b)
    return (f"{n} has {a} {item}. {p.capitalize()} buys {b} more and then gives {c} to {m}. "
            f"How many {item} does {n} have now?"), a + b - c

def _l4_boxes_eat(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, (_, cs), k, q = r.choice(["cookies", "candies", "apples", "oranges", "eggs"]), r.choice(CONTAINERS), r.randint(2, 9), r.randint(3, 12)
    m = r.randint(1, k * q)
    verb = "eats" if item != "eggs" else "cooks"
    return f"{n} has {k} {cs} of {item} with {q} in each. {p.capitalize()} {verb} {m} of them. How many {item} are left?", k * q - m

def _l4_more_than(r: random.Random) -> Problem:
    (n, _), (m, _) = _people(r, 2)
    item, a, b = r.choice(ITEMS), r.randint(3, 40), r.randint(1, 20)
    return f"{n} has {a} {item}. {m} has {b} more {item} than {n}. How many {item} do they have together?", 2 * a + b

def _l4_buy_share(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, k, q = r.choice(ITEMS), r.randint(2, 9), r.randint(2, 10)
    a = r.randint(1, k * q - 1)
    return (f"{n} has {a} {item} and buys {k * q - a} more. {p.capitalize()} shares all of them equally "
            f"among {k} friends. How many {item} does each friend get?"), q

def _l4_change(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, k, price = r.choice(ITEMS), r.randint(2, 9), r.randint(1, 10)
    bill = r.choice([b for b in (20, 50, 100) if b >= k * price])
    return (f"{n} buys {k} {item} that cost {price} dollars each and pays with a {bill}-dollar bill. "
            f"How many dollars of change does {p} get?"), bill - k * price

def _l4_times_as_many(r: random.Random) -> Problem:
    (n, _), (m, _) = _people(r, 2)
    item, a, k = r.choice(ITEMS), r.randint(2, 20), r.randint(2, 5)
    times = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[k]
    return f"{n} has {a} {item}. {m} has {times} as many. How many {item} do they have altogether?", a + k * a

def _l4_groups_loose(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, (_, cs), k, q, m = r.choice(ITEMS), r.choice(CONTAINERS), r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    return f"{n} has {k} {cs} with {q} {item} in each and {m} loose {item}. How many {item} does {p} have in all?", k * q + m

def _l4_class(r: random.Random) -> Problem:
    item, a, k = r.choice(ITEMS), r.randint(15, 35), r.randint(2, 6)
    b = r.randint(1, a - 1)
    return (f"A class has {a} students and {b} of them are absent today. The teacher gives each student "
            f"who is present {k} {item}. How many {item} does the teacher give out?"), (a - b) * k


# ---- level 5: three steps, numbers up to a few hundred ---------------------------------------
def _l5_buy_boxes_give(r: random.Random) -> Problem:
    (n, p), (m, _) = _people(r, 2)
    item, (_, cs), a, k, q = r.choice(ITEMS), r.choice(CONTAINERS), r.randint(20, 200), r.randint(2, 9), r.randint(5, 25)
    c = r.randint(1, a + k * q)
    return (f"{n} has {a} {item}. {p.capitalize()} buys {k} {cs} with {q} {item} in each, then gives {c} "
            f"{item} to {m}. How many {item} does {n} have now?"), a + k * q - c

def _l5_shop(r: random.Random) -> Problem:
    item, a = r.choice(ITEMS), r.randint(100, 400)
    b = r.randint(10, a // 2)
    c = r.randint(10, a - b)
    d = r.randint(20, 200)
    return (f"A shop has {a} {item}. On Monday it sells {b}, on Tuesday it sells {c}, and on Wednesday a "
            f"delivery brings {d} more. How many {item} does the shop have now?"), a - b - c + d

def _l5_wages(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    w, h, d = r.randint(8, 25), r.randint(2, 8), r.randint(2, 6)
    s = r.randint(5, w * h * d)
    return (f"{n} earns {w} dollars an hour and works {h} hours a day for {d} days. Then {p} spends {s} "
            f"dollars on a gift. How many dollars does {p} have left from the pay?"), w * h * d - s

def _l5_three_people(r: random.Random) -> Problem:
    (n, _), (m, _), (o, _) = _people(r, 3)
    item, a, b = r.choice(ITEMS), r.randint(10, 80), r.randint(5, 40)
    return (f"{n} has {a} {item}. {m} has {b} more than {n}, and {o} has twice as many as {m}. "
            f"How many {item} do the three of them have together?"), a + (a + b) + 2 * (a + b)

def _l5_pack_share(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    item, (_, cs), k, q, j = r.choice(ITEMS), r.choice(CONTAINERS), r.randint(3, 9), r.randint(10, 40), r.randint(2, 9)
    total = k * q
    # Keep the remainder plus a multiple of j, at most half, so the rest divides evenly.
    keep = total % j + j * r.randint(0, max(0, (total // 2 - total % j) // j))
    return (f"{n} has {k} {cs} with {q} {item} in each. {p.capitalize()} keeps {keep} {item} and shares the "
            f"rest equally among {j} friends. How many {item} does each friend get?"), (total - keep) // j

def _l5_shopping(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    a, pa, b, pb = r.randint(2, 9), r.randint(3, 15), r.randint(2, 9), r.randint(1, 8)
    cost = a * pa + b * pb
    bill = next(x for x in (50, 100, 200, 500) if x >= cost)
    return (f"{n} buys {a} notebooks at {pa} dollars each and {b} pens at {pb} dollars each. "
            f"{p.capitalize()} pays with {bill} dollars. How many dollars of change does {p} get?"), bill - cost

def _l5_garden(r: random.Random) -> Problem:
    n, p = _people(r, 1)[0]
    rows, per, dead, extra = r.randint(3, 12), r.randint(5, 20), r.randint(1, 20), r.randint(5, 60)
    dead = min(dead, rows * per)
    return (f"{n} plants {rows} rows of flowers with {per} flowers in each row. {dead} of the flowers die, "
            f"and then {p} plants {extra} more. How many flowers are in the garden now?"), rows * per - dead + extra


LEVELS: dict[int, list[Callable[[random.Random], Problem]]] = {
    1: _POOLS_1,
    2: _POOLS_2,
    3: [_l3_buy, _l3_given, _l3_together, _l3_give_away, _l3_take, _l3_fewer, _l3_share, _l3_groups, _l3_daily, _l3_fill],
    4: [_l4_buy_give, _l4_boxes_eat, _l4_more_than, _l4_buy_share, _l4_change, _l4_times_as_many, _l4_groups_loose, _l4_class],
    5: [_l5_buy_boxes_give, _l5_shop, _l5_wages, _l5_three_people, _l5_pack_share, _l5_shopping, _l5_garden],
}


def _check(num: int, difficulty: int, what: str) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or not 1 <= difficulty <= MAX_LEVEL:
        raise PosttrainError(
            f"data.arithmetic.difficulty must be an integer from 1 to {MAX_LEVEL}, got {difficulty!r}. "
            "1 is one-digit sums, 5 is three-step word problems."
        )
    if num < 0:
        raise PosttrainError(f"{what} must be >= 0, got {num}.")


def _even_counts(num: int, difficulty: int) -> dict[int, int]:
    """Split ``num`` as evenly as possible over levels 1..difficulty (lower levels get the remainder)."""
    return {lvl: num // difficulty + (1 if lvl <= num % difficulty else 0) for lvl in range(1, difficulty + 1)}


def _example(question: str, answer: int, level: int) -> PromptExample:
    return PromptExample(
        messages=[{"role": "user", "content": question}],
        metadata={"expected_answer": str(answer), "level": level, "task": "arithmetic"},
    )


def _draw(counts: dict[int, int], rng: random.Random, exclude: Collection[str] = frozenset()) -> list[PromptExample]:
    """Draw ``counts[level]`` problems per level (repeats allowed), skipping questions in ``exclude``."""
    out = []
    for level, n in counts.items():
        kinds = LEVELS[level]
        for _ in range(n):
            for _attempt in range(10_000):
                question, answer = rng.choice(kinds)(rng)
                if question not in exclude:
                    break
            else:  # unreachable while at most MAX_HELD_OUT_FRACTION of any pool is excluded
                raise PosttrainError(f"arithmetic level {level}: every problem is held out for validation.")
            out.append(_example(question, answer, level))
    rng.shuffle(out)  # mix the levels; generation went level by level
    return out


def generate_arithmetic_problems(num: int, difficulty: int, seed: int) -> list[PromptExample]:
    """Generate ``num`` problems drawn evenly from levels 1..difficulty, deterministic for ``seed``.

    Repeats are possible (levels 1-2 have only 110 and 1701 distinct problems). Each example has
    one user message (the bare question; ``load_prompt_data`` adds the instruction) and metadata
    ``{"expected_answer": str, "level": int, "task": "arithmetic"}``.
    """
    _check(num, difficulty, "num")
    return _draw(_even_counts(num, difficulty), random.Random(seed))


def _kind_cap(kind: Callable[[random.Random], Problem]) -> int | None:
    """Most problems of one kind that validation may take (None: unlimited, i.e. templates)."""
    return int(len(kind.problems) * MAX_HELD_OUT_FRACTION) if isinstance(kind, _Pool) else None


def _validation_quotas(num: int, difficulty: int) -> dict[int, int]:
    """Even per-level quotas; what small finite levels cannot supply moves to larger levels."""
    quotas = _even_counts(num, difficulty)
    kind_caps = {lvl: [_kind_cap(k) for k in LEVELS[lvl]] for lvl in quotas}
    caps = {lvl: None if None in c else sum(c) for lvl, c in kind_caps.items()}
    excess = 0
    for lvl in quotas:
        if caps[lvl] is not None and quotas[lvl] > caps[lvl]:
            excess += quotas[lvl] - caps[lvl]
            quotas[lvl] = caps[lvl]
    for lvl in sorted(quotas, reverse=True):  # hardest first: templates never run out
        room = excess if caps[lvl] is None else min(excess, caps[lvl] - quotas[lvl])
        quotas[lvl] += room
        excess -= room
    if excess:
        raise PosttrainError(
            f"data.arithmetic.num_validation={num} is too many distinct problems for difficulty {difficulty}: "
            f"at most {num - excess} can be held out without starving training. Lower "
            "data.arithmetic.num_validation or raise data.arithmetic.difficulty."
        )
    return quotas


def _draw_distinct(counts: dict[int, int], rng: random.Random) -> list[PromptExample]:
    """Draw distinct problems, taking at most ``_kind_cap`` from each finite pool so that every
    kind (e.g. the 81 multiplications of level 2) keeps most of its problems for training."""
    out, seen = [], set()
    for level, n in counts.items():
        kinds = LEVELS[level]
        taken = [0] * len(kinds)
        got = 0
        attempts = 0
        while got < n:
            attempts += 1
            if attempts > 1000 * n:  # a safety net; the caps leave plenty of unused problems
                raise PosttrainError(
                    f"could not draw {n} distinct level-{level} validation problems; "
                    "lower data.arithmetic.num_validation."
                )
            i = rng.randrange(len(kinds))
            cap = _kind_cap(kinds[i])
            if cap is not None and taken[i] >= cap:
                continue
            question, answer = kinds[i](rng)
            if question in seen:
                continue
            seen.add(question)
            taken[i] += 1
            got += 1
            out.append(_example(question, answer, level))
    rng.shuffle(out)
    return out


def make_arithmetic_splits(cfg: ArithmeticConfig) -> tuple[list[PromptExample], list[PromptExample]]:
    """Return (train, validation) for the arithmetic task.

    Validation is drawn first from its own seed stream, without repeats, and the training draw
    skips those questions, so the splits are disjoint by question text. Validation keeps the even
    level mix except where a small level (1 or 2) would lose more than a quarter of its distinct
    problems; that share moves to the hardest level.
    """
    _check(cfg.num_train, cfg.difficulty, "data.arithmetic.num_train")
    _check(cfg.num_validation, cfg.difficulty, "data.arithmetic.num_validation")
    # A string seed gives an independent stream that is still fully determined by cfg.seed.
    validation = _draw_distinct(
        _validation_quotas(cfg.num_validation, cfg.difficulty), random.Random(f"arithmetic-validation-{cfg.seed}")
    )
    held_out = {ex.messages[0]["content"] for ex in validation}
    train = _draw(_even_counts(cfg.num_train, cfg.difficulty), random.Random(cfg.seed), held_out)
    return train, validation
