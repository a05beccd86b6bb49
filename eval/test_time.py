"""Test-time compute in task scoring: what k sampled answers per problem buy, and how long the
answers are.

- maj@k (self-consistency, Wang et al. 2022): the answer most of the first k samples give (their
  parsed answers; a sample with none does not vote; a tie goes to the answer given first) is
  graded as the model's answer. For countdown, distinct expressions are distinct votes.
- pass@k: Chen et al.'s unbiased estimate that at least one of k samples is right, from all the
  samples drawn (pass_k of them per problem).
- Intervals (95%): Wilson's over the problems for both. maj@k is right or wrong per problem;
  pass@k's per-problem estimate lies in [0, 1], whose variance at mean p is at most p (1 - p),
  so the Wilson interval of the mean is conservative for it.
- Lengths: mean characters of the greedy completions and, for cot tasks, inside their think
  blocks (see `thinking_chars`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from data_prep.tasks import TaskBase, score
from data_prep.thinking import CLOSE, OPEN
from eval.stats import pass_at_k, wilson_interval
from pipeline.engine.errors import PipelineError
from pipeline.stages.rows import draw_problem

DEFAULT_K = (1, 2, 4, 8, 16, 32)  # the k scored by default, those up to the samples drawn
PASS_KEY = re.compile(r"task_pass_at_(\d+)$")
MAJ_KEY = re.compile(r"task_maj_at_(\d+)$")


def k_list(samples: int, chosen: Sequence[int] | None = None) -> list[int]:
    """The k scored with `samples` per problem: `chosen` (default: DEFAULT_K up to `samples`),
    and `samples` itself, sorted, once each."""
    picked = [k for k in DEFAULT_K if k <= samples] if chosen is None else list(chosen)
    return sorted({*picked, samples})


def k_problems(
    chosen: Sequence[int] | None, samples: int, sampled_problems: int, field: str
) -> list[str]:
    """Why a recipe's k list cannot be scored (one line each), for the plan's checks."""
    if chosen is None:
        return []
    if not sampled_problems:
        return [
            f"{field}: maj@k and pass@k score sampled answers, but pass_k_problems: 0 samples "
            "none; set pass_k_problems (e.g. 200) or remove k_values"
        ]
    if not chosen or min(chosen) < 1:
        return [f"{field}: {list(chosen)} must list k >= 1, e.g. [1, 4, {samples}]"]
    over = sorted({k for k in chosen if k > samples})
    if over:
        return [
            f"{field}: k={over[0]} needs {over[0]} samples per problem, but pass_k={samples} are "
            f"drawn; drop the k above {samples} or raise pass_k to {over[-1]}"
        ]
    return []


def ood_problem(task: TaskBase, num: int, field: str) -> str | None:
    """Why `num` out-of-distribution problems cannot be drawn from `task`, or None."""
    try:
        task.ood_task()
    except PipelineError:
        return (
            f"{field}: task {task.FAMILY} has no out-of-distribution split (generated tasks have "
            "one: arithmetic, sort, reverse, addition, countdown); set ood_problems: 0"
        )
    return draw_problem(task, "ood", num, field)


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the first sample giving the answer most samples give (ties: the answer
    given first), or None when no sample has an answer."""
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is not None:
            votes[answer] = votes.get(answer, 0) + 1
            first.setdefault(answer, index)
    if not votes:
        return None
    top = max(votes.values())
    return min(first[a] for a, v in votes.items() if v == top)


def thinking_chars(completion: str) -> int:
    """Characters inside a completion's first think block: from `<think>` to the next
    `</think>`, or to the end when the block never closes (the model was still thinking when
    it stopped); 0 without a `<think>`."""
    start = completion.find(OPEN)
    if start < 0:
        return 0
    start += len(OPEN)
    end = completion.find(CLOSE, start)
    return (end if end >= 0 else len(completion)) - start


def length_metrics(task: TaskBase, completions: Sequence[str]) -> dict[str, float]:
    """Mean completion length in characters and, for a cot task, mean thinking length."""
    count = max(1, len(completions))
    metrics = {"task_completion_chars": sum(map(len, completions)) / count}
    if getattr(task, "format", "direct") == "cot":
        metrics["task_thinking_chars"] = sum(map(thinking_chars, completions)) / count
    return metrics


def with_interval(key: str, hits: Sequence[float]) -> dict[str, float]:
    """`key` = the mean of per-problem values in [0, 1], with its Wilson interval."""
    low, high = wilson_interval(sum(hits), len(hits))
    return {key: sum(hits) / len(hits), f"{key}_low": low, f"{key}_high": high}


def sampled_metrics(
    task: TaskBase,
    problems: Sequence[dict[str, Any]],
    drawn: Sequence[Sequence[str]],
    ks: Sequence[int],
) -> dict[str, float]:
    """pass@k and maj@k (with intervals) for each k of `ks` from `drawn` (samples per problem)."""
    graded = [
        [score(task, c, p["answer"], p)[0] == 1.0 for c in cs]
        for cs, p in zip(drawn, problems, strict=True)
    ]
    answers = [[task.parse(c) for c in cs] for cs in drawn]
    metrics: dict[str, float] = {}
    for k in ks:
        n = len(graded[0])
        metrics |= with_interval(f"task_pass_at_{k}", [pass_at_k(n, sum(g), k) for g in graded])
        voted = [majority_vote(a[:k]) for a in answers]
        metrics |= with_interval(
            f"task_maj_at_{k}", [v is not None and g[v] for v, g in zip(voted, graded, strict=True)]
        )
    metrics["task_sampled_accuracy"] = sum(map(sum, graded)) / sum(map(len, graded))
    return metrics


def k_curve(metrics: dict[str, Any], pattern: re.Pattern[str]) -> list[tuple[int, float]]:
    """(k, value) of the pass@k or maj@k keys (`PASS_KEY`, `MAJ_KEY`) of one model, by k."""
    found = [(int(m.group(1)), v) for key, v in metrics.items() if (m := pattern.match(key))]
    return sorted(found)
