"""Baselines: train and score a list of models on one dataset with the same splits.

The `task` picks the family (pipeline.baselines.TASKS): classical estimators named by import path
(regression, classification, clustering, embedding, bias-variance curves) or small torch nets
(vision, sequence). Every model sees the same rows and seed and is scored by
pipeline.baselines.metrics; the stage writes one comparison table to export/results.json, the run
report and W&B, with the task's figures. The stage runs in one process: a stage-level
`launch.nproc` above 1 is refused and the recipe-wide launch is ignored.
"""

from __future__ import annotations

from pipeline.baselines import get_task
from pipeline.baselines.config import Config
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import Input, PlanView, StageSpec

__all__ = ["SPEC", "Config", "run"]


def run(ctx: StageContext) -> None:
    """Evaluate every model of the task on one dataset and write the comparison table."""
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
    from pipeline.engine.sections import write_sections

    cfg: Config = ctx.config  # type: ignore[assignment]
    task = get_task(cfg.task)
    finished = finished_results(ctx.checkpoint_dir)  # kept only when resuming the same config
    with ctx.tracker(resume_step=resume_step(finished)) as tracker:
        job = Job(
            stage=ctx.name,
            config=cfg,
            models={n: task.Model.model_validate(s) for n, s in cfg.models.items()},
            options=task.Options.model_validate(cfg.options),
            seed=ctx.seed,
            export_dir=ctx.export_dir,
            work_dir=ctx.checkpoint_dir,
            log=ctx.log,
            inputs=ctx.inputs,
            tracker=tracker,
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


def task_problems(view: PlanView) -> list[str]:
    """The task's own checks of the resolved inputs (the generative task needs images)."""
    return get_task(view.config.task).plan_problems(view)


SPEC = StageSpec(
    Config,
    run,
    output="table",
    # generative baselines read an images stage's shards and may sample from a diffusion stage's
    # export (`models.N.from_stage`); other tasks read neither
    inputs=(
        Input("images", ("images",), required=False),
        Input("diffusion", ("diffusion",), field="models.*.from_stage", nearest=False,
              required=False, many=True),
    ),
    plan_check=task_problems,
)  # fmt: skip
