"""Training rows from a user's JSONL file, checked as a plan checks them and as stages read them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.engine.errors import PipelineError

BUILTIN_TASK = "builtin:task"


def first_row(path: str, required: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """The first row of a JSONL data file, checked like every row `read_jsonl` reads."""
    from data_prep.sources import jsonl_records

    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"data {path}: no such file; give a JSONL path or {BUILTIN_TASK}")
    for number, row in jsonl_records(file):
        return _checked(row, number, required, path, "data")
    raise PipelineError(f"data {path}: the file has no rows; add training examples")


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
            f"{where}: data {path}: no such file; give a JSONL path or {BUILTIN_TASK}"
        )
    from data_prep.sources import jsonl_records

    rows = [_checked(row, number, required, path, where) for number, row in jsonl_records(file)]
    if not rows:
        raise PipelineError(f"{where}: {path} has no rows; add training examples")
    return rows


def dataset(rows: list[dict[str, Any]], columns: Callable[[dict], dict] | None = None) -> Any:
    """A `datasets.Dataset` of rows (optionally mapped to the trainer's columns)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # TRL's map() passes would print a bar each
    return Dataset.from_list([columns(r) for r in rows] if columns else rows)
