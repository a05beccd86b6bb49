"""Diffusion rows of the generative task (`from_stage`): a diffusion stage's export sampled on
the task's pixel grid, with that stage's own training time and size from its manifest.
"""

from __future__ import annotations

import time

import numpy as np

from eval import images as image_eval
from pipeline.baselines.core import Job
from pipeline.baselines.generative_config import SAMPLE_BATCH, GenerativeModel, Pixels
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Resolved


def diffusion_input(job: Job, name: str) -> Resolved:
    """The diffusion stage that model `name`'s from_stage names, as the plan resolved it."""
    where = job.where(name, "from_stage")
    found = next((r for r in job.inputs("diffusion") if r.where == where), None)
    if found is None:
        raise PipelineError(
            f"{where}: not a diffusion stage upstream of {job.stage}; name one listed in "
            f"stages.{job.stage}.after"
        )
    return found


def sampler_problem(where: str, model: GenerativeModel, diffusion: Resolved) -> str | None:
    """A row's sampler (at `where`) that does not fit its diffusion stage's objective."""
    from pipeline.diffusion.class_conditional_pipeline import OBJECTIVE_SAMPLERS

    objective = diffusion.config.objective.kind
    allowed = OBJECTIVE_SAMPLERS[objective]
    if model.sampler is None or model.sampler in allowed:
        return None
    return (
        f"{where}: {model.sampler} does not fit the {objective} model of {diffusion.stage!r}; "
        f"use {' or '.join(allowed)}"
    )


def sample_diffusion(
    job: Job, data: Pixels, name: str, model: GenerativeModel
) -> tuple[dict, np.ndarray, float]:
    """(result, integer samples, seconds) of a diffusion stage's export, on the data's grid."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from pipeline.diffusion.class_conditional_pipeline import ClassConditionalPipeline
    from pipeline.engine.manifest import stage_record

    diffusion = diffusion_input(job, name)
    diffusers_logging.disable_progress_bar()
    pipe = ClassConditionalPipeline.from_pretrained(diffusion.path)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    objective = pipe.config.objective
    sampler, steps = model.sampler, model.steps
    if sampler is None:
        sampler = image_eval.DEFAULT_SAMPLERS[objective][0][0]
    pipe.use_sampler(sampler)
    count, classes = job.options.num_samples, pipe.config.num_classes
    labels = np.arange(count) % classes if model.conditional else np.full(count, classes)
    started, out = time.perf_counter(), []
    for i, start in enumerate(range(0, count, SAMPLE_BATCH)):
        images = pipe(
            class_labels=labels[start : start + SAMPLE_BATCH].tolist(),
            num_inference_steps=steps,
            guidance_scale=model.guidance_scale,
            generator=torch.Generator(pipe.device).manual_seed(job.seed + 1 + i),
            output_type="np",
        ).images  # [B, H, W, C] in [0, 1]
        out.append(np.rint(images.transpose(0, 3, 1, 2) * (data.levels - 1)).astype(np.int64))
    seconds = time.perf_counter() - started
    samples = np.concatenate(out)
    if samples.shape[1:] != data.train.shape[1:]:
        raise PipelineError(
            f"{job.where(name, 'from_stage')}: stage {diffusion.stage!r} makes "
            f"images of shape {samples.shape[1:]}, the images stage {data.train.shape[1:]}; train "
            f"it on the same images stage"
        )
    record = stage_record(diffusion.path.parent)  # the stage's directory, above export/
    metrics = {
        "bits_per_dim": None,
        "likelihood": "none",
        "train_seconds": record.duration_s,
        "params": record.summary.get("params"),
        "sampler": f"{sampler} {steps} steps",
    }
    return {"metrics": metrics, "objective": objective}, samples, seconds
