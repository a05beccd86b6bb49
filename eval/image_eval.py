"""Stage kind `image_eval`: sample from the upstream diffusion stage's export and score the
samples against the images stage's real images.

A class-conditional export (ClassConditionalPipeline) is scored per class (eval/images.py); a
text-to-image export (TextToImagePipeline, recognised by its pipeline file) one sample per
held-out caption, with the compositional scorer where the images hold scenes
(eval/images_text.py). The config and the sampler check are shared (eval/images.py).
"""

from __future__ import annotations

from eval.images import Config, evaluate, sampler_problems
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import Input, StageSpec

TEXT_PIPELINE_FILE = "text_to_image_pipeline.py"  # what a text-to-image export ships


def run(ctx: StageContext) -> None:
    """Sample with each sampler, score against the real images, write grids and tables."""
    from diffusers.utils import logging as diffusers_logging

    from eval.images_text import evaluate_text
    from pipeline.train.runtime import torch_threads

    cfg = ctx.config
    assert isinstance(cfg, Config)
    export, images_dir = ctx.input("diffusion").path, ctx.input("images").path
    diffusers_logging.disable_progress_bar()
    with torch_threads(cfg.cpu_threads):
        if (export / TEXT_PIPELINE_FILE).is_file():
            evaluate_text(ctx, cfg, export, images_dir)
        else:
            evaluate(ctx, cfg)


SPEC = StageSpec(
    Config,
    run,
    output="evaluation",
    inputs=(Input("diffusion", ("diffusion",)), Input("images", ("images",))),
    plan_check=sampler_problems,
)
