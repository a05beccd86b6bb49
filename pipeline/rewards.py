"""Verifiable reward functions for GRPO/RLOO, selected by name in the recipe.

Each has TRL's signature `f(prompts, completions, **columns) -> list[float]` and never raises on
a malformed completion (None, empty, chat messages, text around the number): it scores it 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pipeline.errors import PipelineError

RewardFunc = Callable[..., list[float]]
ANSWER = re.compile(r"\s*(-?\d+)")
BARE_ANSWER = re.compile(r"\s*-?\d+\s*")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's content of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def parse_answer(completion: Any) -> int | None:
    """The integer a completion starts with (after whitespace), or None."""
    match = ANSWER.match(completion_text(completion))
    return int(match.group(1)) if match else None


def arithmetic_exact(
    prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any
) -> list[float]:
    """1 when the completion starts with the exact integer answer, else 0."""
    return [
        float(parse_answer(c) is not None and parse_answer(c) == _as_int(a))
        for c, a in zip(completions, answer, strict=True)
    ]


def arithmetic_close(
    prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any
) -> list[float]:
    """Partial credit for a near answer: 1 / (1 + |error|), 0 when there is no integer.

    A dense signal for weak policies: exact match alone gives almost every group of a model
    that is rarely right zero reward variance, so GRPO has nothing to learn from.
    """
    scores = []
    for c, a in zip(completions, answer, strict=True):
        got, want = parse_answer(c), _as_int(a)
        scores.append(0.0 if got is None or want is None else 1.0 / (1.0 + abs(got - want)))
    return scores


def answer_format(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """1 when the completion is a bare integer (surrounding whitespace allowed), else 0."""
    return [float(BARE_ANSWER.fullmatch(completion_text(c)) is not None) for c in completions]


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


REWARDS: dict[str, RewardFunc] = {
    "arithmetic_exact": arithmetic_exact,
    "arithmetic_close": arithmetic_close,
    "answer_format": answer_format,
}


def reward_functions(names: list[str], where: str) -> list[RewardFunc]:
    """The registered functions for `names`; an unknown name is a one-line error."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise PipelineError(
            f"{where}: unknown reward function {unknown[0]!r}; use one of {', '.join(REWARDS)}"
        )
    return [REWARDS[n] for n in names]
