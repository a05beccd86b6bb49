"""Verifiable reward functions for GRPO/RLOO, selected by name in the recipe, scored by the task.

Each has TRL's signature `f(prompts, completions, **columns) -> list[float]` and never raises on
a malformed completion (None, empty, chat messages, text around the answer): it scores it 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data_prep.tasks import TaskBase, is_bare_answer, score
from pipeline.engine.errors import PipelineError

RewardFunc = Callable[..., list[float]]
NAMES = ("exact", "partial", "format")
RENAMED = {"arithmetic_exact": "exact", "arithmetic_close": "partial", "answer_format": "format"}


def exact_reward(task: TaskBase) -> RewardFunc:
    """1 when the completion starts with the exact answer, else 0."""

    def exact(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any):
        return [score(task, c, a)[0] for c, a in zip(completions, answer, strict=True)]

    return exact


def partial_reward(task: TaskBase) -> RewardFunc:
    """The task's partial credit (1 / (1 + |error|) for arithmetic, the share of right digits for
    digit strings); 1 for the exact answer, 0 for no answer.

    A dense signal for weak policies: exact match alone gives almost every group of a model that
    is rarely right zero reward variance, so GRPO has nothing to learn from.
    """

    def partial(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any):
        return [score(task, c, a)[1] for c, a in zip(completions, answer, strict=True)]

    return partial


def format_reward(task: TaskBase) -> RewardFunc:
    """1 when the completion is a bare answer (surrounding whitespace allowed), else 0."""

    def format(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:  # noqa: A001
        return [float(is_bare_answer(c)) for c in completions]

    return format


BUILDERS: dict[str, Callable[[TaskBase], RewardFunc]] = {
    "exact": exact_reward,
    "partial": partial_reward,
    "format": format_reward,
}


def reward_functions(names: list[str], task: TaskBase, where: str) -> list[RewardFunc]:
    """The reward functions for `names`, scoring `task`; an unknown name is a one-line error."""
    for name in names:
        if name in RENAMED:
            raise PipelineError(
                f"{where}.rewards: {name!r} was renamed to {RENAMED[name]!r}; use {RENAMED[name]!r}"
            )
        if name not in BUILDERS:
            raise PipelineError(
                f"{where}.rewards: unknown reward function {name!r}; use one of {', '.join(NAMES)}"
            )
    return [BUILDERS[name](task) for name in names]
