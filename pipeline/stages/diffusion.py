"""Stage kind `diffusion`: train a class-conditional DiT or UNet, or a text-conditioned PixArt or
MMDiT transformer (pipeline/stages/diffusion_text.py), and export a diffusers pipeline.

Pixel space reads the images stage's shards; latent space reads the vae stage's cached latents and
ships its VAE in the export. The objective is DDPM (epsilon or v prediction) or flow matching
(rectified flow with logit-normal timesteps). Labels are dropped to a null label with probability
`label_dropout` so the export can sample with classifier-free guidance. The export is a
`ClassConditionalPipeline` directory (pipeline/diffusion_pipeline.py) holding the EMA weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.diffusion.objectives import ObjectiveConfig
from pipeline.diffusion.training import ImageTrainingConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.models.diffusion import DiffusionModelConfig
from pipeline.stages.diffusion_text import (
    TEXT_INPUT,
    caption_table,
    export_text_pipeline,
    is_text_arch,
    save_pipeline,
    text_problems,
)
from pipeline.stages.vae import LATENTS_DIR, VAE_DIR


class Config(ImageTrainingConfig):
    """Train a diffusion model on an images (or vae latents) stage's shards."""

    kind: Literal["diffusion"] = "diffusion"
    model: DiffusionModelConfig = DiffusionModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    space: Literal["pixel", "latent"] = Field(
        "pixel", description="latent: train on the upstream vae stage's latents"
    )
    label_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="probability a label becomes the null label, or a caption the empty one "
        "(text arches), for classifier-free guidance",
    )
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA of the weights; the export's")


def input_dirs(ctx: StageContext, cfg: Config) -> tuple[Path, Path | None]:
    """(shards directory, VAE directory or None) this stage trains on."""
    if cfg.space == "pixel":
        return ctx.input("images").path, None
    vae = ctx.optional_input("vae")
    if vae is None:
        raise PipelineError(latent_without_vae(ctx.name))
    return vae.path / LATENTS_DIR, vae.path / VAE_DIR


def latent_without_vae(stage: str) -> str:
    """The one-line error (at plan time and at run time) for latent space without a vae."""
    return (
        f"stages.{stage}: space: latent needs a vae stage upstream; add one (kind: vae) and list "
        f"it in `after:`, or use space: pixel"
    )


def input_problems(view: PlanView) -> list[str]:
    """The vae input is optional for pixel space and required for latent space."""
    if view.config.space == "latent" and view.first("vae") is None:
        return [latent_without_vae(view.name)]
    return []


def size_problems(view: PlanView) -> list[str]:
    """The model takes the size of the images (or latents) it will train on, when the images
    stage fixes it (`image_size`, or a built-in source's own)."""
    from data_prep.images import planned_size
    from pipeline.models.diffusion import size_problem

    planned = planned_size(view.first("images"))
    if planned is None:
        return []
    size, origin = planned
    if view.config.space == "latent":
        vae = view.first("vae")
        if vae is None or vae.config is None or size % (factor := vae.config.model.downsample):
            return []  # the vae stage's own check names that
        size, origin = size // factor, f"{origin} {size} / the vae's {factor}x"
    problem = size_problem(view.config.model, size, f"stages.{view.name}", origin)
    return [problem] if problem else []


def run(ctx: StageContext) -> None:
    import torch

    from data_prep.images import ImageShards
    from pipeline.diffusion.objectives import DiffusionObjective
    from pipeline.diffusion.training import train_images
    from pipeline.models.diffusion import DENOISERS
    from pipeline.train.runtime import torch_threads

    cfg = ctx.config
    assert isinstance(cfg, Config)
    data_dir, vae_dir = input_dirs(ctx, cfg)
    writer = "vae" if vae_dir is not None else "images"
    splits = ImageShards(data_dir, "train", writer), ImageShards(data_dir, "val", writer)
    channels, height, width = splits[0].shape
    if height != width:
        raise PipelineError(
            f"stages.{ctx.name}: inputs are {height}x{width}; the models need square inputs, "
            f"set image_size in the images stage"
        )
    torch.manual_seed(ctx.seed)
    model, null_label = build_model(ctx, cfg, splits, channels, height)
    objective = DiffusionObjective(
        cfg.objective, null_label=null_label, label_dropout=cfg.label_dropout,
        clip_sample=cfg.space == "pixel",
    )  # fmt: skip
    with torch_threads(cfg.cpu_threads):
        trained = train_images(
            ctx,
            cfg,
            model,
            objective.loss,
            splits,
            cfg.ema_decay,
            list(DENOISERS[cfg.model.arch].wrap_classes),
        )
        state = trained.ema_state_dict()
        if trained.accelerator.is_main_process:
            denoiser = trained.accelerator.unwrap_model(trained.model, keep_torch_compile=False)
            common = {"objective": cfg.objective.kind, "config": cfg.model_dump(mode="json")}
            if is_text_arch(cfg.model.arch):
                loads = export_text_pipeline(
                    ctx.export_dir, denoiser, state, objective.scheduler(), vae_dir,
                    ctx.input("text"), **common,
                )  # fmt: skip
                ctx.log.info(loads)
            else:
                export_pipeline(
                    ctx.export_dir, denoiser, state, objective.scheduler(), vae_dir,
                    classes=splits[0].classes, **common,
                )  # fmt: skip
        trained.accelerator.wait_for_everyone()
    ctx.write_summary(trained.summary, headline="val_ema_loss")


def build_model(
    ctx: StageContext, cfg: Config, splits: tuple[Any, Any], channels: int, size: int
) -> tuple[Any, int]:
    """(the denoiser, its null label): class-conditional on the data's classes, or on the
    cached captions (whose last row, the empty caption, is the null label)."""
    from pipeline.models.diffusion import build_denoiser, resolve_num_classes
    from pipeline.models.text_denoisers import build_text_denoiser

    where = f"stages.{ctx.name}"
    if is_text_arch(cfg.model.arch):
        table = caption_table(ctx, ctx.input("images").path, splits)
        return build_text_denoiser(cfg.model, channels, size, table, where), table.null_row
    num_classes = resolve_num_classes(cfg.model, splits[0].num_classes, where)
    return build_denoiser(cfg.model, channels, size, num_classes, where), num_classes


def export_pipeline(
    export_dir: Path,
    denoiser: Any,
    state_dict: dict[str, Any],
    scheduler: Any,
    vae_dir: Path | None,
    classes: list[str],
    objective: str,
    config: dict[str, Any] | None = None,
) -> None:
    """Save a ClassConditionalPipeline with `state_dict` (the EMA weights) into export_dir.

    Written into a temporary directory that is renamed into place, so a crash never leaves half
    an export; the pipeline's source file and provenance.json (`config`, the resolved stage
    config, with the code and package versions) travel with it.
    """
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from pipeline.diffusion import class_conditional_pipeline as diffusion_pipeline
    from pipeline.diffusion.class_conditional_pipeline import ClassConditionalPipeline

    model = type(denoiser).from_config(denoiser.config)
    model.load_state_dict(state_dict)
    model.eval()
    role = "transformer" if isinstance(model, DiTTransformer2DModel) else "unet"
    pipe = ClassConditionalPipeline(
        scheduler=scheduler,
        vae=AutoencoderKL.from_pretrained(vae_dir) if vae_dir is not None else None,
        num_classes=len(classes),
        class_names=classes,
        objective=objective,
        **{role: model},
    )
    save_pipeline(export_dir, pipe, Path(diffusion_pipeline.__file__), config)


SPEC = StageSpec(
    Config,
    run,
    output="diffusion",
    inputs=(Input("images", ("images",)), Input("vae", ("vae",), required=False), TEXT_INPUT),
    plan_check=lambda view: input_problems(view) + text_problems(view) + size_problems(view),
)
