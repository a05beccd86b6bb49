"""The contract every baseline task follows, and what the stage does with a task's results.

A task loads one dataset, evaluates each model of the stage on it (same rows, same seed) and
returns per-model metrics; the stage caches each model's result so a rerun after a crash skips
finished models, then writes one comparison table (results.json, report, W&B) and the task's
figures. A task never writes the manifest, the report file or tracking rows itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.engine.config import Strict
from pipeline.engine.manifest import atomic_write_json

if TYPE_CHECKING:
    from pipeline.baselines.config import Config
    from pipeline.engine.inputs import PlanView, Resolved
    from pipeline.engine.tracking import Tracker

FIGURES_DIR = "figures"
PREDICTIONS_DIR = "predictions"


class NoOptions(Strict):
    """A task without stage-wide settings: `options:` must be empty."""


@dataclass
class Job:
    """One baseline stage's run: its config, typed models and options, and where outputs go."""

    stage: str
    config: Config
    models: dict[str, Any]  # name -> the task's Model instance
    options: Any  # the task's Options instance
    seed: int
    export_dir: Path
    work_dir: Path  # per-model results of this attempt (kept for a resume)
    log: logging.Logger
    inputs: Callable[[str], list[Resolved]]  # ctx.inputs: the stage's declared inputs, resolved
    tracker: Tracker | None = None
    _step: int = field(default=0, repr=False)

    def where(self, model: str, *keys: str) -> str:
        """Recipe path of a model (or one of its keys), for error messages."""
        return ".".join(("stages", self.stage, "models", model, *keys))

    def log_row(self, model: str, row: dict[str, float], **step_keys: int) -> None:
        """Track a row of a model (e.g. an epoch) as `<model>/<key>`; rows get increasing steps."""
        self._step += 1
        if self.tracker is not None:
            values = {**row, **step_keys}
            self.tracker.log({f"{model}/{k}": v for k, v in values.items()}, step=self._step)

    def save_arrays(self, model: str, **arrays: np.ndarray) -> None:
        """Keep a model's arrays (predictions, embeddings) for figures and export/predictions/."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f".{model}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, self.work_dir / f"{model}.npz")

    def arrays(self, model: str) -> dict[str, np.ndarray]:
        """Arrays saved by `save_arrays` for a model (empty when none were saved)."""
        path = self.work_dir / f"{model}.npz"
        if not path.is_file():
            return {}
        with np.load(path) as data:
            return {key: data[key] for key in data.files}

    def figure(self, filename: str) -> tuple[Path, str]:
        """Where to save a figure, and its path relative to export/ for a report section."""
        path = self.export_dir / FIGURES_DIR / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, f"{FIGURES_DIR}/{filename}"


class Task:
    """A family of baselines. Subclasses set the class attributes and implement `evaluate`.

    `evaluate` returns `{"metrics": {name: number or None}, ...}` (any other JSON-able keys go to
    results.json); `columns` orders the metrics of the comparison table and `primary` picks the
    best model.
    """

    Model: ClassVar[type[Strict]]
    Options: ClassVar[type[Strict]] = NoOptions
    primary: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    columns: ClassVar[tuple[str, ...]]

    def dataset_signature(self, config: Config) -> dict[str, Any]:
        """What identifies the dataset's content (part of the stage fingerprint)."""
        from pipeline.baselines.data import dataset_signature

        return dataset_signature(config.dataset)

    def load(self, job: Job) -> Any:
        """The data every model of the stage is evaluated on."""
        raise NotImplementedError

    def check(self, job: Job, data: Any) -> None:
        """Fail on a bad model spec before any model trains (default: nothing to check)."""

    def plan_problems(self, view: PlanView) -> list[str]:
        """What the plan can tell of the stage's inputs before anything runs, one line each."""
        return []

    def evaluate(self, job: Job, data: Any, name: str, model: Any) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, job: Job, data: Any) -> str:
        """One line for the comparison table: which rows were used and how they were split."""
        return ""

    def sections(self, job: Job, data: Any, results: dict[str, dict[str, Any]]) -> list[dict]:
        """Extra report sections (figures, per-model tables) after the comparison table."""
        return []


def clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, NaN and inf to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finished_results(work_dir: Path) -> dict[str, dict[str, Any]]:
    """Results of models an earlier attempt of this stage finished (same config), by name."""
    if not work_dir.is_dir():
        return {}
    return {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(work_dir.glob("*.json"))
    }


def resume_step(finished: dict[str, dict[str, Any]]) -> int | None:
    """The last tracking step of the finished models: rows after it were a crashed model's."""
    return max((r["step"] for r in finished.values()), default=None)


def evaluate_models(
    job: Job, task: Task, data: Any, finished: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Every model's result in recipe order; each is cached as soon as it is done."""
    results: dict[str, dict[str, Any]] = {}
    job._step = resume_step(finished) or 0
    for name, model in job.models.items():
        if name in finished:
            results[name] = finished[name]
            job.log.info("%s: finished in an earlier attempt, reusing its result", name)
            continue
        started = time.perf_counter()
        result = task.evaluate(job, data, name, model)
        result["seconds"] = round(time.perf_counter() - started, 3)
        metrics = result["metrics"]
        numbers = {k: v for k, v in metrics.items() if _is_number(v)}
        job.log_row(name, numbers)
        result["step"] = job._step
        results[name] = clean(result)
        atomic_write_json(job.work_dir / f"{name}.json", results[name])
        shown = [f"{c} {metrics[c]:.4g}" for c in task.columns[:4] if _is_number(metrics.get(c))]
        job.log.info("%s: %s", name, " ".join(shown))
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def best_model(results: dict[str, dict[str, Any]], task: Task) -> tuple[str, float] | None:
    """The model with the best primary metric (ignoring models without one)."""
    scored = [
        (name, r["metrics"][task.primary])
        for name, r in results.items()
        if r["metrics"].get(task.primary) is not None
    ]
    if not scored:
        return None
    pick = max if task.higher_is_better else min
    return pick(scored, key=lambda item: item[1])


def comparison_table(
    results: dict[str, dict[str, Any]], task: Task
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: one row per model, the task's metrics then seconds."""
    columns = ["model", *task.columns, "seconds"]
    rows = [
        [name, *(r["metrics"].get(c) for c in task.columns), r.get("seconds")]
        for name, r in results.items()
    ]
    return columns, rows


def write_results(
    job: Job, task: Task, results: dict[str, dict[str, Any]], best: tuple[str, float] | None
) -> dict[str, Any]:
    """export/results.json: the comparison table plus every model's full result."""
    columns, rows = comparison_table(results, task)
    payload = clean(
        {
            "task": job.config.task,
            "dataset": job.config.dataset,
            "seed": job.seed,
            "primary": task.primary,
            "higher_is_better": task.higher_is_better,
            "best": {"model": best[0], "value": best[1]} if best else None,
            "columns": columns,
            "rows": rows,
            "models": results,
        }
    )
    atomic_write_json(job.export_dir / "results.json", payload)
    for name in results:
        source = job.work_dir / f"{name}.npz"
        if source.is_file():
            target = job.export_dir / PREDICTIONS_DIR / f"{name}.npz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return payload


def report_sections(
    job: Job, task: Task, data: Any, results: dict[str, dict[str, Any]], best: Any
) -> list[dict[str, Any]]:
    """The comparison table first, then the task's own sections (figures, details)."""
    columns, rows = comparison_table(results, task)
    direction = "higher" if task.higher_is_better else "lower"
    described = task.describe(job, data)
    note = f"{described} " if described else ""
    note += f"Best by {task.primary} ({direction} is better): {best[0]}." if best else ""
    table = {
        "title": f"{job.config.task} baselines on {job.config.dataset}",
        "note": note,
        "columns": columns,
        "rows": rows,
    }
    return [table, *task.sections(job, data, results)]


def summary_metrics(
    results: dict[str, dict[str, Any]], task: Task, best: tuple[str, float] | None
) -> dict[str, Any]:
    """Manifest summary: the best model and every model's primary metric."""
    summary: dict[str, Any] = {
        f"{name}/{task.primary}": r["metrics"].get(task.primary) for name, r in results.items()
    }
    if best:
        summary = {"best_model": best[0], f"best_{task.primary}": best[1], **summary}
    return summary


def log_to_wandb(tracker: Tracker, payload: dict[str, Any], images: list[Path]) -> None:
    """The comparison table as a W&B Table and the figures as W&B Images (when W&B is on)."""
    run = tracker.wandb_run
    if run is None:
        return
    import wandb

    logged: dict[str, Any] = {
        "comparison": wandb.Table(columns=payload["columns"], data=payload["rows"])
    }
    logged.update({f"figures/{path.stem}": wandb.Image(str(path)) for path in images})
    run.log(logged)
