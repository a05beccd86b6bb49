"""The baseline stage's config: task, dataset, splits and the models to compare.

It lives with the tasks (below the stage module) because every task reads it through `Job.config`;
`pipeline.baselines.stage` re-exports it as the stage kind's `Config`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.baselines import TASKS, get_task
from pipeline.engine.config import NAME_PATTERN, StageConfig
from pipeline.engine.schema_errors import format_errors


class Config(StageConfig):
    """Compare models of one family on one dataset (see recipes/baselines/)."""

    kind: Literal["baseline"]
    task: str = Field(description=f"what is compared: {', '.join(TASKS)}")
    dataset: str = Field(
        description="builtin:diabetes|breast-cancer|wine|digits|iris, a CSV file with a header "
        "(features numeric, label in `target`), or a text source for task: sequence"
    )
    target: str = Field("target", description="label column of a CSV dataset")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="held-out share (stratified); clustering/embedding use all"
    )
    cv_folds: int = Field(0, ge=0, description="k-fold CV on the training rows; 0: none")
    max_rows: int | None = Field(None, ge=10, description="seeded subsample of the dataset")
    models: dict[str, dict[str, Any]] = Field(
        min_length=1, description="model name -> spec; the task defines the spec's keys"
    )
    options: dict[str, Any] = Field({}, description="task-wide settings; the task defines them")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        """Reject a task that is not registered in pipeline.baselines.TASKS."""
        if task not in TASKS:
            close = difflib.get_close_matches(task, list(TASKS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown task{hint} (known: {', '.join(TASKS)})")
        return task

    @field_validator("dataset")
    @classmethod
    def _absolute(cls, dataset: str) -> str:
        """File datasets by absolute path, so every process (and Slurm job) finds them."""
        if dataset.startswith("builtin:"):
            return dataset
        return str(Path(dataset).expanduser().absolute())

    @model_validator(mode="after")
    def _check(self) -> Config:
        """Validate each model spec and the options against the task's own classes."""
        if self.cv_folds == 1:
            raise ValueError("cv_folds: 1 is not cross-validation; use 0 (none) or 2 or more")
        if self.launch is not None and (self.launch.nproc or 1) > 1:
            raise ValueError("baseline stages run in one process; set launch.nproc: 1 or drop it")
        task = get_task(self.task)
        errors: list[InitErrorDetails] = []
        for name, spec in self.models.items():
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
            try:
                self.models[name] = task.Model.model_validate(spec).model_dump(mode="json")
            except ValidationError as exc:
                errors += _nested_errors(exc, task.Model, ("models", name))
        try:
            self.options = task.Options.model_validate(self.options).model_dump(mode="json")
        except ValidationError as exc:
            errors += _nested_errors(exc, task.Options, ("options",))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def data_signature(self) -> dict[str, Any]:
        """The dataset's identity as the task defines it (part of the fingerprint)."""
        return get_task(self.task).dataset_signature(self)


def _nested_errors(
    exc: ValidationError, model: type, prefix: tuple[str, ...]
) -> list[InitErrorDetails]:
    """A task model's errors re-rooted at `prefix`, so messages name stages.S.models.M.key."""
    out: list[InitErrorDetails] = []
    for err, line in zip(exc.errors(), format_errors(exc, model, ()), strict=True):
        loc = (*prefix, *err["loc"])
        if err["type"] == "extra_forbidden":  # keep the allowed keys and close-match hint
            message = line.split(": ", 1)[1]
            custom = PydanticCustomError("unknown_key", message)
            out.append({"type": custom, "loc": loc, "input": err["input"]})
        else:
            detail: InitErrorDetails = {"type": err["type"], "loc": loc, "input": err["input"]}
            if "ctx" in err:
                detail["ctx"] = err["ctx"]
            out.append(detail)
    return out
