"""Training rows from a user's JSONL file, and the problems a task can give, checked as a plan
checks them and as stages read them."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    from data_prep.task_base import TaskBase

BUILTIN_TASK = "builtin:task"


def first_row(path: str, required: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """The first row of a JSONL data file, checked like every row `read_jsonl` reads (errors
    start with the field, `data:`; the plan puts the stage before it)."""
    from data_prep.sources import jsonl_records

    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"data: {path}: no such file; give a JSONL path or {BUILTIN_TASK}")
    for number, row in jsonl_records(file):
        return _checked(row, number, required, path, "data")
    raise PipelineError(f"data: {path}: the file has no rows; add training examples")


def _checked(
    row: Any, number: int, required: tuple[tuple[str, ...], ...], path: str, where: str
) -> dict[str, Any]:
    if not isinstance(row, dict) or not any(all(k in row for k in keys) for keys in required):
        wanted = " or ".join("/".join(keys) for keys in required)
        raise PipelineError(
            f"{where}: {path} line {number}: a row needs the keys {wanted}; fix the file"
        )
    return row


def read_jsonl(path: str, required: tuple[tuple[str, ...], ...], where: str) -> list[dict]:
    """Rows of a JSONL file, each holding every key of one of the `required` key sets."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(
            f"{where}.data: {path}: no such file; give a JSONL path or {BUILTIN_TASK}"
        )
    from data_prep.sources import jsonl_records

    field = f"{where}.data"
    rows = [_checked(row, number, required, path, field) for number, row in jsonl_records(file)]
    if not rows:
        raise PipelineError(f"{field}: {path} has no rows; add training examples")
    return rows


def draw_problem(task: TaskBase, split: str, num: int, field: str) -> str | None:
    """Why `num` problems cannot be drawn from the task's `split` (what `problem_keys` raises at
    run time, after the stages before it), or None. A task file that cannot be read is left to
    the input checks, which name it."""
    from data_prep.tasks import split_size

    try:
        available = split_size(task, split)
    except PipelineError:
        return None
    if num <= available:
        return None
    return (
        f"{field}: {num} problems asked of the {split} split of task {task.FAMILY}, which has "
        f"{available}; ask for fewer or {task.GROW}"
    )


def task_stage_draws(cfg: Any) -> dict[str, tuple[str, int]]:
    """What a task stage (sft, rlhf) draws from its task, {field: (split, problems)}: its training
    problems (builtin:task data) and the held-out ones it scores after and during training."""
    draws = {"eval_problems": ("test", cfg.eval_problems)}
    if cfg.data == BUILTIN_TASK:
        draws = {"num_examples": ("train", cfg.num_examples), **draws}
        if cfg.eval_every:
            draws["eval_every_problems"] = ("test", cfg.eval_every_problems)
        if getattr(cfg, "guard", None) is not None:  # gold problems come after the training rows
            draws["guard.problems"] = ("train", cfg.num_examples + cfg.guard.problems)
    return draws


def draws_problems(task: TaskBase, draws: dict[str, tuple[str, int]], where: str) -> list[str]:
    """`draw_problem` of each field of `draws` ({field: (split, problems)}) of stage `where`."""
    return [
        problem
        for field, (split, num) in draws.items()
        if (problem := draw_problem(task, split, num, f"{where}.{field}"))
    ]


def pairs_problem(task: TaskBase, field: str) -> str | None:
    """Why the task cannot give preference pairs or multiple choices (a JSONL task without
    `rejected` answers: the error `near_miss` raises at run time), or None."""
    try:
        task.check_inputs()
    except PipelineError:
        return None  # a file that cannot be read is named by the input checks
    try:
        task.near_miss(next(iter(task.all_keys())), random.Random(0))
    except PipelineError as exc:
        return f"{field}: {exc}"
    return None


def dataset(rows: list[dict[str, Any]], columns: Callable[[dict], dict] | None = None) -> Any:
    """A `datasets.Dataset` of rows (optionally mapped to the trainer's columns)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # TRL's map() passes would print a bar each
    return Dataset.from_list([columns(r) for r in rows] if columns else rows)
