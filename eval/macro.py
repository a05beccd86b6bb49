"""Macro averages over a task's subtasks (lengths, operators, digits): each subtask weighs the
same, however many of the held-out problems it holds, so a large easy slice cannot hide a small
hard one the way it does in the micro average (the share of all problems answered right).

Interval: Price and Bonett's (2004) adjusted Wald interval for a linear function of independent
binomial proportions, here their mean over S subtasks: each subtask's proportion is taken as
(x + 2/S) / (n + 4/S), and the interval is their mean +- z times the normal approximation's
standard error sqrt(sum p~ (1 - p~) / (n + 4/S)) / S (for one subtask it is the plus-four
Agresti-Coull interval). Unlike the plain Wald interval it keeps a width when a subtask scores 0
or 1, and it accounts for a small subtask weighing as much as a large one.

Paired test: a stratified sign-flip (permutation) test of the difference in macro averages of
two models on the same problems. Under the null hypothesis each discordant problem's pair of
outcomes is exchangeable, so the problems gained in subtask s are Binomial(m_s, 1/2) of its m_s
discordant ones, independently; the p-value is the share of seeded draws of that null
distribution at least as far from 0 as observed. For one subtask it is McNemar's exact test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from eval.stats import Z_95

NULL_DRAWS = 100_000  # draws of the null distribution: p-values good to about +-0.001 near 0.05
NULL_SEED = 0


def subtask_counts(correct: Sequence[bool], subtasks: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{subtask: (right, problems)}, subtasks in sorted order."""
    if len(correct) != len(subtasks):
        raise ValueError(f"one subtask per outcome: {len(correct)} outcomes, {len(subtasks)}")
    counts: dict[str, list[int]] = {}
    for ok, subtask in zip(correct, subtasks, strict=True):
        count = counts.setdefault(subtask, [0, 0])
        count[0] += bool(ok)
        count[1] += 1
    return {s: (counts[s][0], counts[s][1]) for s in sorted(counts)}


def macro_interval(counts: dict[str, tuple[int, int]], z: float = Z_95) -> tuple[float, float]:
    """Price-Bonett interval (95% by default) of the mean of the subtasks' proportions,
    clipped to [0, 1]; (0, 1) with no problems."""
    if not counts:
        return 0.0, 1.0
    groups = len(counts)
    adjusted = [((x + 2 / groups) / (n + 4 / groups), n + 4 / groups) for x, n in counts.values()]
    centre = sum(p for p, _ in adjusted) / groups
    half = z * math.sqrt(sum(p * (1 - p) / n for p, n in adjusted)) / groups
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_average(
    correct: Sequence[bool], subtasks: Sequence[str], z: float = Z_95
) -> dict[str, float]:
    """The mean of the subtasks' accuracies with its interval (widened, if ever needed, to hold
    the estimate, which the adjusted centre can pass by a hair at 0 or 1) and the subtask count."""
    counts = subtask_counts(correct, subtasks)
    value = sum(x / n for x, n in counts.values()) / len(counts) if counts else 0.0
    low, high = macro_interval(counts, z)
    return {
        "macro": value,
        "low": min(low, value),
        "high": max(high, value),
        "subtasks": len(counts),
    }


def macro_paired_test(
    first: Sequence[bool],
    second: Sequence[bool],
    subtasks: Sequence[str],
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
) -> dict[str, float]:
    """Stratified sign-flip test of `second`'s macro average against `first`'s (same problems):
    the macro difference, problems gained and lost, and the two-sided p-value."""
    import numpy as np

    if not len(first) == len(second) == len(subtasks):
        raise ValueError(f"paired test needs the same problems: {len(first)} vs {len(second)}")
    groups: dict[str, list[int]] = {}  # subtask -> [problems, gained, lost]
    for a, b, subtask in zip(first, second, subtasks, strict=True):
        group = groups.setdefault(subtask, [0, 0, 0])
        group[0] += 1
        group[1] += bool(b and not a)
        group[2] += bool(a and not b)
    count = max(1, len(groups))
    difference = sum((g - lost) / n for n, g, lost in groups.values()) / count
    rng = np.random.default_rng(seed)
    null = np.zeros(draws)
    for n, gained, lost in groups.values():
        flips = gained + lost
        if flips:
            null += (2 * rng.binomial(flips, 0.5, size=draws) - flips) / (n * count)
    # Ties with the observed value count as extreme (the exact test's convention).
    extreme = int(np.count_nonzero(np.abs(null) >= abs(difference) - 1e-12))
    return {
        "gained": sum(g for _, g, _ in groups.values()),
        "lost": sum(lost for _, _, lost in groups.values()),
        "difference": difference,
        "p_value": min(1.0, (extreme + 1) / (draws + 1)),
    }
