"""Statistics that tell models apart: Wilson intervals, the exact McNemar test, pass@k.

Plain Python (math only), checked against scipy in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for no trials.
    `successes` may be a sum of per-trial values in [0, 1] (conservative for them: such a value
    of mean p has variance at most p (1 - p))."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (doubled smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two models' correctness on the same problems.

    Only discordant problems count: `gained` (second right, first wrong) and `lost`; under the
    null hypothesis of equal accuracy each discordant problem is a fair coin.
    """
    if len(first) != len(second):
        raise ValueError(f"paired test needs the same problems: {len(first)} vs {len(second)}")
    gained = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
    lost = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
    return {
        "gained": gained,
        "lost": lost,
        "difference": (gained - lost) / max(1, len(first)),
        "p_value": binomial_two_sided(gained, gained + lost),
    }


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from `num_samples` samples of which `num_correct` are right (Chen et al.)."""
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
