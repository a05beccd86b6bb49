"""Verifiable reward functions for GRPO/RLOO, selected by name in the recipe, scored by the task,
or the user's own named by import path (`package.module:function`).

For a task with `format: cot` the answer is read after `</think>` only (an answer inside the
thinking never counts): `exact` and `partial` are then the answer rewards of reasoning RL, and
`format` checks the tags (DeepSeek-R1's pair); `overlong` shapes the length.

Each has TRL's signature `f(prompts, completions, **columns) -> list[float]` and never raises on
a malformed completion (None, empty, chat messages, text around the answer): it scores it 0. The
user's functions are wrapped to keep that promise: a raise, a list of the wrong length or a value
that is no finite number gives the completions concerned 0 and a warning (once per kind).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator

from data_prep.tasks import GeneratedTask, TaskBase, completion_text, score
from pipeline.engine.errors import PipelineError
from pipeline.engine.schema_errors import suggest
from pipeline.train.user_code import (
    bad_number,
    is_import_path,
    load_function,
    one_line,
    shorten,
    warn_once,
)

RewardFunc = Callable[..., list[float]]
NAMES = ("exact", "partial", "format", "overlong", "steps")
RENAMED = {"arithmetic_exact": "exact", "arithmetic_close": "partial", "answer_format": "format"}

log = logging.getLogger("pipeline.rewards")


def exact_reward(task: TaskBase) -> RewardFunc:
    """1 when the task's scorer finds the right answer (generated tasks: the completion starts
    with it; cot: the text after its one `</think>` does), else 0."""

    def exact(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any):
        return [
            score(task, c, a, {"prompt": completion_text(p)})[0]
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    return exact


def partial_reward(task: TaskBase) -> RewardFunc:
    """The task's partial credit (1 / (1 + |error|) for arithmetic, the share of right digits for
    digit strings, a JSONL task's scorer function's credit); 1 for the exact answer, 0 for none.

    A dense signal for weak policies: exact match alone gives almost every group of a model that
    is rarely right zero reward variance, so GRPO has nothing to learn from.
    """

    def partial(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any):
        return [
            score(task, c, a, {"prompt": completion_text(p)})[1]
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    return partial


def format_reward(task: TaskBase) -> RewardFunc:
    """1 when the completion is a bare answer (surrounding whitespace allowed), else 0; for a
    cot task, when it is one think block with steps and no stray tags, then one bare answer."""

    def format(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:  # noqa: A001
        return [float(task.is_bare(c)) for c in completions]

    return format


def overlong_reward(task: TaskBase) -> RewardFunc:
    """A soft penalty on length (DAPO's overlong shaping, against the problem's own reference):
    0 up to the length of the reference completion (the worked solution of a cot task), then
    falling linearly to -1 at twice that length, -1 beyond; lengths in characters.

    Weighted beside an answer reward, it stops rambling and repeated steps without rewarding
    short wrong answers (it never pays more than 0).
    """

    def overlong(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any):
        penalties = []
        for p, c, a in zip(prompts, completions, answer, strict=True):
            budget = max(task.reference_length(completion_text(p), str(a)), 1)
            excess = len(completion_text(c)) - budget
            penalties.append(0.0 if excess <= 0 else -min(excess / budget, 1.0))
        return penalties

    return overlong


def steps_reward(task: TaskBase) -> RewardFunc:
    """Process credit from the worked solution, for cot tasks with one right solution per problem
    (sort, reverse, arithmetic, addition): the share of its steps the think block writes, in
    order, before its first wrong one (GeneratedTask.step_credit).

    Dense where the answer reward is flat: of 8 samples that all miss the answer, the one that
    errs late in a long multiplication scores above the one that errs at its first digit.
    """

    if problem := steps_problem(task):
        raise PipelineError(problem)
    worked: GeneratedTask = task  # type: ignore[assignment]

    def steps(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        pairs = zip(prompts, completions, strict=True)
        return [worked.step_credit(completion_text(p), c) for p, c in pairs]

    return steps


def steps_problem(task: TaskBase) -> str | None:
    """Why reward `steps` cannot score `task`, or None."""
    if not isinstance(task, GeneratedTask) or not task.UNIQUE_STEPS:
        return (
            f"reward steps needs a task with one worked solution per problem (sort, reverse, "
            f"arithmetic or addition), not {task.FAMILY}; use exact or partial"
        )
    if task.format != "cot":
        return "reward steps scores worked steps; set the task's format: cot"
    return None


BUILDERS: dict[str, Callable[[TaskBase], RewardFunc]] = {
    "exact": exact_reward,
    "partial": partial_reward,
    "format": format_reward,
    "overlong": overlong_reward,
    "steps": steps_reward,
}


def check_reward_name(name: str) -> str:
    """A built-in reward name, or an import path whose function resolves; else a one-line
    ValueError (for pydantic: a dry run catches a misspelt name or a missing module)."""
    try:
        _resolve(name, "")
    except PipelineError as exc:
        raise ValueError(str(exc)) from None
    return name


RewardName = Annotated[str, AfterValidator(check_reward_name)]
# What TRL passes every reward function besides the dataset's columns (GRPOTrainer and
# RLOOTrainer's _calculate_rewards); any other parameter without a default must be a column.
TRAINER_ARGUMENTS = (
    "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
    "environments",
)  # fmt: skip


def reward_columns(name: str, task: TaskBase) -> list[str]:
    """The dataset columns reward `name` takes by name (the built-ins read `answer`), read from
    its signature: a prompt row without one fails the trainer's call of the function."""
    function = load_function(name, "") if is_import_path(name) else _resolve(name, "")(task)
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in TRAINER_ARGUMENTS
    ]


def reward_functions(names: list[str], task: TaskBase, where: str) -> list[RewardFunc]:
    """The reward functions for `names`, scoring `task`; an unknown name is a one-line error."""
    return [_resolve(name, f"{where}.rewards")(task) for name in names]


def _resolve(name: str, where: str) -> Callable[[TaskBase], RewardFunc]:
    """The builder of reward `name`: a built-in, or the user's function guarded."""
    prefix = f"{where}: " if where else ""
    if name in RENAMED:
        raise PipelineError(
            f"{prefix}{name!r} was renamed to {RENAMED[name]!r}; use {RENAMED[name]!r}"
        )
    if is_import_path(name):
        function = load_function(name, where)
        return lambda _task: guarded(function, name)
    if name not in BUILDERS:
        raise PipelineError(
            f"{prefix}unknown reward function {name!r}{suggest(name, NAMES)} (use one of "
            f"{', '.join(NAMES)} or an import path package.module:function)"
        )
    return BUILDERS[name]


def guarded(function: Callable[..., Any], spec: str) -> RewardFunc:
    """`function` (TRL's reward signature) as a reward that never raises: completions it raises
    on, or gets no finite number for, score 0 with a warning; None stays None (TRL's "does not
    apply")."""
    if inspect.iscoroutinefunction(function):
        return function  # TRL awaits async rewards on its own loop; a sync guard cannot wrap them

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        try:
            values = function(prompts, completions, **columns)
        except Exception as exc:  # the user's reward failing must not end a run
            if len(completions) > 1:
                # Score one completion at a time, so only those it raises on lose their reward.
                return [
                    value
                    for i in range(len(completions))
                    for value in reward(prompts[i : i + 1], completions[i : i + 1],
                                        **_one_row(columns, i, len(completions)))
                ]  # fmt: skip
            kind = type(exc).__name__
            warn_once(
                log, spec, kind,
                f"reward {spec} raised {kind}: {one_line(exc)} on completion "
                f"{shorten(completion_text(completions[0]) if completions else '')}; scored 0",
            )  # fmt: skip
            return [0.0] * len(completions)
        return _checked(spec, values, completions)

    reward.__name__ = reward.__qualname__ = getattr(function, "__name__", spec)
    return reward


def _one_row(columns: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """The dataset columns of one completion (lists of one per completion); the rest as given."""
    return {
        key: value[index : index + 1] if isinstance(value, list | tuple) and len(value) == count
        else value
        for key, value in columns.items()
    }  # fmt: skip


def _checked(spec: str, values: Any, completions: list[Any]) -> list[Any]:
    """`values` as one float (or None) per completion; 0 where it is no finite number."""
    if not isinstance(values, list | tuple) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, list | tuple) else shorten(values)
        warn_once(
            log, spec, "wrong length",
            f"reward {spec} returned {got} for {len(completions)} completions (first "
            f"{shorten(completion_text(completions[0]) if completions else '')}); scored 0",
        )  # fmt: skip
        return [0.0] * len(completions)
    checked: list[Any] = []
    for value, completion in zip(values, completions, strict=True):
        problem = None if value is None else bad_number(value)
        if problem is not None:
            warn_once(
                log, spec, "bad value",
                f"reward {spec} {problem} on completion {shorten(completion_text(completion))}; "
                "scored 0",
            )  # fmt: skip
        checked.append(None if value is None else 0.0 if problem else float(value))
    return checked
