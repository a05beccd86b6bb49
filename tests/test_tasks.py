"""Verifiable tasks, their rewards and the statistics that compare models (no training here)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from data_prep.tasks import (
    ArithmeticTask,
    ReverseTask,
    SortTask,
    TaskBase,
    parse_answer,
    preference_pairs,
    problem_keys,
    split_size,
    task_documents,
    task_problems,
)
from eval.harness import distractors
from eval.stats import mcnemar, pass_at_k, wilson_interval
from pipeline.engine.errors import PipelineError
from pipeline.stages.rewards import reward_functions

TASKS = [
    ArithmeticTask(),
    ArithmeticTask(min_operand=3, max_operand=30, operators=["+", "-"]),
    ArithmeticTask(max_operand=999, operators=["*"], test_percent=25),
    ReverseTask(),
    ReverseTask(min_length=2, max_length=4, digits="0123"),
    SortTask(min_length=5, max_length=9),
]


def test_rewards_score_known_strings() -> None:
    arithmetic = ArithmeticTask()
    exact, partial, bare = reward_functions(["exact", "partial", "format"], arithmetic, "s")
    answers = ["12", "12", "12", "12", "12", "-3", "7", "7", "7"]
    completions: list[Any] = [" 12", "12\n", " 12 apples", " 13", "", " -3", None,
                              [{"content": " 7"}], "x7"]  # fmt: skip
    prompts = [""] * len(answers)
    assert exact(prompts, completions, answer=answers) == [1, 1, 1, 0, 0, 1, 0, 1, 0]
    assert bare(prompts, completions) == [1, 1, 0, 1, 0, 1, 0, 1, 0]
    assert partial(prompts, completions, answer=answers) == [1, 1, 1, 0.5, 0, 1, 0, 1, 0]
    assert partial(["p", "p"], [" 9", " 3"], answer=["10", "10"]) == [0.5, 0.125]
    assert exact(["p"], [" 5"], answer=["five"]) == [0.0]
    assert partial(["p"], [" 5"], answer=["five"]) == [0.0]  # a non-number answer never raises
    # Digit strings: exact is string equality (leading zeros count), partial the share of digits.
    exact, partial = reward_functions(["exact", "partial"], ReverseTask(), "s")
    got = [" 0321", "0321", " 321", " 0312", " 03215", "-", "\n0321"]
    assert exact(prompts[:7], got, answer=["0321"] * 7) == [1, 1, 0, 0, 0, 0, 1]
    assert partial(prompts[:7], got, answer=["0321"] * 7) == [1, 1, 0, 0.5, 0.8, 0, 1]
    assert parse_answer("  -42 is it") == "-42" and parse_answer("forty") is None


def test_renamed_and_unknown_rewards_are_one_line_errors() -> None:
    with pytest.raises(PipelineError, match="'arithmetic_exact' was renamed to 'exact'"):
        reward_functions(["arithmetic_exact"], ArithmeticTask(), "stages.rlhf")
    with pytest.raises(PipelineError, match="unknown reward function 'exakt'"):
        reward_functions(["exakt"], ArithmeticTask(), "stages.rlhf")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.FAMILY}-{t.size()}")
def test_held_out_split_never_in_training_rows(task: TaskBase) -> None:
    num_test, num_train = min(300, split_size(task, "test")), min(2000, split_size(task, "train"))
    test_prompts = {p["prompt"] for p in task_problems(task, "test", num_test, seed=1)}
    for seed in (0, 1, 7):
        train = task_problems(task, "train", num_train, seed)
        assert not test_prompts & {p["prompt"] for p in train}
        pairs = preference_pairs(task, "train", 200, seed)
        assert not test_prompts & {p["prompt"] for p in pairs}
    text = "\n".join(itertools.islice(task_documents(task, num_train, seed=3), 60))
    assert not [p for p in test_prompts if p + " " in text]
    # The split of a problem depends on its prompt alone: a wider task keeps every test problem.
    if isinstance(task, ArithmeticTask) and task.max_operand < 99:
        wider = task.model_copy(update={"min_operand": 0, "max_operand": 99})
        wide_test = {
            p["prompt"] for p in task_problems(wider, "test", split_size(wider, "test"), 0)
        }
        assert test_prompts <= wide_test


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.FAMILY}-{t.size()}")
def test_problems_are_right_distinct_and_seeded(task: TaskBase) -> None:
    num = min(150, split_size(task, "test"))
    problems = task_problems(task, "test", num, seed=5)
    assert len({p["prompt"] for p in problems}) == num
    assert problems == task_problems(task, "test", num, seed=5)
    assert problems != task_problems(task, "test", num, seed=6)
    rng = random.Random(0)
    for key in problem_keys(task, "test", 30, 0):
        answer = task.answer(key)
        if isinstance(task, ArithmeticTask):
            a, op, b = key
            assert int(answer) == eval(f"{a} {op} {b}")  # noqa: S307 - our own digits
        elif isinstance(task, ReverseTask):
            assert answer == key[0][::-1]
        else:
            assert list(answer) == sorted(key[0])
        wrong = distractors(task, key, rng)
        assert len(set(wrong)) == 3 and answer not in wrong


def test_too_many_problems_is_a_one_line_error() -> None:
    small = ArithmeticTask(max_operand=5, operators=["+"])
    with pytest.raises(PipelineError, match="the test split has .* cannot draw 1000"):
        task_problems(small, "test", 1000, 0)


@pytest.mark.parametrize("successes,trials", [(0, 10), (3, 10), (57, 300), (980, 1000), (5, 5)])
def test_wilson_interval_matches_scipy(successes: int, trials: int) -> None:
    from scipy.stats import binomtest

    expected = binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(expected.low, abs=1e-9)
    assert high == pytest.approx(expected.high, abs=1e-9)


@pytest.mark.parametrize("gained,lost", [(0, 0), (5, 1), (40, 20), (120, 60), (7, 7)])
def test_mcnemar_matches_scipy_exact_binomial(gained: int, lost: int) -> None:
    from scipy.stats import binomtest

    first = [False] * gained + [True] * lost + [True] * 30 + [False] * 11
    second = [True] * gained + [False] * lost + [True] * 30 + [False] * 11
    test = mcnemar(first, second)
    assert (test["gained"], test["lost"]) == (gained, lost)
    expected = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    assert test["p_value"] == pytest.approx(expected, rel=1e-9)
    assert test["difference"] == pytest.approx((gained - lost) / len(first))


def test_pass_at_k_matches_counting_subsets() -> None:
    for n, c, k in [(8, 0, 8), (8, 1, 8), (10, 3, 4), (5, 5, 2), (6, 2, 1)]:
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError, match="needs at least 8 samples"):
        pass_at_k(4, 1, 8)
