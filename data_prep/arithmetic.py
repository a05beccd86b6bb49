"""Generated arithmetic problems with verifiable answers, for pretraining text, SFT and RL.

Every problem belongs to the train or the test split by a hash of the problem itself, so the
held-out split is never trained on whatever seed, count or stage asks for problems.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import cache
from typing import Any

OPERATORS = ("+", "-", "*")
MAX_OPERAND = 99
TEST_PERCENT = 10
PROBLEMS_PER_DOCUMENT = 16
# Bump when the problem space or text format changes (it is part of the source fingerprint).
GENERATOR_VERSION = 1

SPLITS = ("train", "test")


def problem_split(a: int, op: str, b: int) -> str:
    """The split a problem belongs to: a pure function of the problem, never of a seed."""
    digest = hashlib.sha256(f"{a} {op} {b}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def make_problem(a: int, op: str, b: int) -> dict[str, Any]:
    """One problem as {"prompt", "completion", "answer"}; `answer` is the exact integer result."""
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"What is {a} {op} {b}?", "completion": str(answer), "answer": answer}


@cache
def _split_problems(split: str) -> tuple[tuple[int, str, int], ...]:
    """Every problem of a split in a fixed order."""
    return tuple(
        (a, op, b)
        for op in OPERATORS
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
        if problem_split(a, op, b) == split
    )


def arithmetic_problems(split: str, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` distinct problems of `split`, in an order fixed by `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = list(_split_problems(split))
    if not 0 <= num <= len(pool):
        raise ValueError(f"split {split!r} has {len(pool)} problems, cannot draw {num}")
    random.Random(seed).shuffle(pool)
    return [make_problem(*p) for p in pool[:num]]


def format_problem(problem: dict[str, Any]) -> str:
    """The pretraining text of one problem: prompt, a space, completion."""
    return f"{problem['prompt']} {problem['completion']}"


def arithmetic_documents(seed: int = 0) -> Iterator[str]:
    """Every train problem once, shuffled by `seed`, grouped into newline-separated documents."""
    pool = _split_problems("train")
    problems = arithmetic_problems("train", len(pool), seed)
    for start in range(0, len(problems), PROBLEMS_PER_DOCUMENT):
        yield "\n".join(format_problem(p) for p in problems[start : start + PROBLEMS_PER_DOCUMENT])


def plausible_wrong_answer(problem: dict[str, Any], rng: random.Random) -> int:
    """A near miss: off by one or ten, or the last digit changed; never the right answer."""
    answer = problem["answer"]
    candidates = [answer + d for d in (-10, -1, 1, 10)] + [answer - answer % 10 + (answer + 3) % 10]
    return rng.choice([c for c in candidates if c != answer])


def preference_pairs(split: str, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` problems as {"prompt", "chosen", "rejected", "answer"}: correct vs. a near miss."""
    rng = random.Random(seed)
    return [
        {
            "prompt": p["prompt"],
            "chosen": f" {p['answer']}",
            "rejected": f" {plausible_wrong_answer(p, rng)}",
            "answer": p["answer"],
        }
        for p in arithmetic_problems(split, num, seed)
    ]
