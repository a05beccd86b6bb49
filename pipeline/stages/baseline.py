"""Baselines: train and score a list of models on one dataset with the same splits.

The `task` picks the family (pipeline.baselines.TASKS): classical estimators named by import path
(regression, classification, clustering, embedding, bias-variance curves) or small torch nets
(vision, sequence). Every model sees the same rows and seed and is scored by eval.tabular; the
stage writes one comparison table to export/results.json, the run report and W&B, with the
task's figures. The stage runs in one process: a stage-level `launch.nproc` above 1 is refused
and the recipe-wide launch is ignored.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.baselines import TASKS, get_task
from pipeline.config import NAME_PATTERN, StageConfig, format_errors
from pipeline.context import StageContext


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
    seed: int | None = Field(None, description="splits and model seeds; default: recipe seed")
    max_rows: int | None = Field(None, ge=10, description="seeded subsample of the dataset")
    models: dict[str, dict[str, Any]] = Field(
        min_length=1, description="model name -> spec; the task defines the spec's keys"
    )
    options: dict[str, Any] = Field({}, description="task-wide settings; the task defines them")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
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


def run(ctx: StageContext) -> None:
    from eval.report import write_sections
    from pipeline.baselines.core import (
        Job,
        best_model,
        evaluate_models,
        finished_results,
        log_to_wandb,
        report_sections,
        resume_step,
        summary_metrics,
        write_results,
    )

    cfg: Config = ctx.config  # type: ignore[assignment]
    task = get_task(cfg.task)
    finished = finished_results(ctx.checkpoint_dir)  # kept only when resuming the same config
    with ctx.tracker(resume_step=resume_step(finished)) as tracker:
        job = Job(
            stage=ctx.name,
            config=cfg,
            models={n: task.Model.model_validate(s) for n, s in cfg.models.items()},
            options=task.Options.model_validate(cfg.options),
            seed=ctx.seed if cfg.seed is None else cfg.seed,
            export_dir=ctx.export_dir,
            work_dir=ctx.checkpoint_dir,
            log=ctx.log,
            tracker=tracker,
            upstream=ctx.upstream,
        )
        data = task.load(job)
        task.check(job, data)
        ctx.log.info("%s on %s: %d models", cfg.task, cfg.dataset, len(job.models))
        results = evaluate_models(job, task, data, finished)
        best = best_model(results, task)
        payload = write_results(job, task, results, best)
        sections = report_sections(job, task, data, results, best)
        write_sections(ctx.export_dir, sections)
        images = [ctx.export_dir / image for s in sections for image in s.get("images", [])]
        log_to_wandb(tracker, payload, images)
        summary = summary_metrics(results, task, best)
        tracker.summary(summary)
    note = f"best of {len(results)}: {best[0]} {task.primary}={best[1]:.4g}" if best else None
    ctx.write_summary(summary, headline=f"best_{task.primary}" if best else None, note=note)
