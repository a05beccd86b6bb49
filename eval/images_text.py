"""image_eval for a text-to-image export (a TextToImagePipeline): one sample per held-out caption.

The prompts are the first `text_prompts` captions of the images stage's val split (for
builtin:shapes, the generator's compositional test split, categories interleaved). Each sampler's
images are scored against the real training images like class-conditional samples (FD, KID,
precision/recall, nearest-neighbour ratio, on the features of the CNN trained on the train
split's labels), by FD against the held-out images of the same captions (`fd_heldout`), and,
where the images stage kept each scene's ground truth (builtin:shapes),
by the GenEval-style analytic scorer (eval/shapes_score.py): per category, with a 95% Wilson
interval, scenes with a held-out (shape, colour) combination reported apart ("<category>/unseen").
The grid shows the first prompts' samples, one per cell, captions listed in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.engine.context import StageContext

if TYPE_CHECKING:
    from eval.images import Config, SamplerSpec


def evaluate_text(ctx: StageContext, cfg: Config, export: Path, images_dir: Path) -> None:
    """The image_eval stage's work for a text-to-image export (module docstring)."""
    import torch

    from data_prep.image_captions import read_captions, read_scenes
    from data_prep.images import ImageShards
    from eval.image_report import write_outputs
    from eval.images import (
        Scorer,
        features,
        frechet_distance,
        nearest_figure,
        reference_rows,
        sampler_specs,
        save_grid_png,
        subset,
    )
    from pipeline.diffusion.text_to_image_pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(export)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    specs = sampler_specs(ctx, cfg, pipe.config.objective)
    train, val = ImageShards(images_dir, "train"), ImageShards(images_dir, "val")
    count = min(cfg.text_prompts, len(val))
    captions = read_captions(images_dir, "val")[:count]
    scenes = read_scenes(images_dir, "val")[:count] if val.index.splits["val"].scenes_sha256 else []
    val_images, val_labels = val.take(np.arange(count))
    scorer = Scorer(subset(train, cfg.max_real_images, ctx.seed), val_images, cfg, ctx.seed)
    rows = reference_rows(scorer, val_images, val_labels, ctx.seed)
    heldout_features = features(scorer.classifier, val_images)  # once, for every sampler
    summary: dict[str, Any] = {"classifier_val_accuracy": rows[0][1]["class_accuracy"]}
    grids, sections = [], []
    if scenes:  # the detector on real held-out scenes: the scorer's own accuracy
        real = shapes_scores(scenes, val_images)
        summary["detector_real_overall"] = real["overall"]["accuracy"]
    for spec in specs:
        images, seconds = generate_text(pipe, spec, captions, cfg, ctx.seed)
        metrics = {**scorer.score(images, val_labels), "images_per_second": count / seconds}
        # FD against the held-out scenes the prompts describe (the headline FD is against train)
        metrics["fd_heldout"] = frechet_distance(
            heldout_features, features(scorer.classifier, images)
        )
        name = f"{spec.sampler}_{spec.steps}"
        if scenes:
            shapes = shapes_scores(scenes, images)
            metrics |= {f"shapes/{k}": v["accuracy"] for k, v in shapes.items()}
            sections.append(shapes_section(name, shapes, real))
        rows.append((name, metrics, spec.steps, count))
        summary.update({f"{name}/{k}": v for k, v in metrics.items()})
        if len(grids) == 0:
            summary.update(metrics)  # the first sampler's figures are the headline ones
            nearest_figure(scorer, images[: cfg.grid_columns], 1, ctx.export_dir / "nearest.png")
        shown = min(len(images), cfg.grid_columns * 4)
        save_grid_png(images[:shown], ctx.export_dir / f"grid_{name}.png", cfg.grid_columns)
        grids.append(f"grid_{name}.png")
        ctx.log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    prompts = [f"{i + 1}. {c}" for i, c in enumerate(captions[: cfg.grid_columns * 4])]
    write_outputs(ctx, cfg.guidance_scale, rows, grids, prompts, summary, sections)


def generate_text(
    pipe: Any, spec: SamplerSpec, captions: list[str], cfg: Config, seed: int
) -> tuple[np.ndarray, float]:
    """(images [N, C, H, W] in [-1, 1], seconds): one sample per caption with one sampler."""
    import time

    import torch

    pipe.use_sampler(spec.sampler)
    out, started = [], time.perf_counter()
    for i, start in enumerate(range(0, len(captions), cfg.batch_size)):
        batch = pipe(
            prompt=captions[start : start + cfg.batch_size],
            num_inference_steps=spec.steps,
            guidance_scale=cfg.guidance_scale,
            generator=torch.Generator(pipe.device).manual_seed(seed + i),
            output_type="pt",
        ).images
        out.append(batch.cpu().numpy() * 2 - 1)
    return np.concatenate(out).astype(np.float32), time.perf_counter() - started


def shapes_scores(scenes: list[dict], images: np.ndarray) -> dict[str, dict[str, float]]:
    """eval.shapes_score's summary of `images` ([N, 3, H, W] in [-1, 1]) against the scenes."""
    from data_prep.shapes import Scene
    from eval.shapes_score import score, summarise

    pixels = np.clip(np.rint((images + 1) * 127.5), 0, 255).astype(np.uint8)
    return summarise(
        score(Scene.from_json(s), image) for s, image in zip(scenes, pixels, strict=True)
    )


def shapes_section(
    name: str, shapes: dict[str, dict[str, float]], real: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """A report table: per category, the samples' accuracy with its interval beside the
    detector's accuracy on the real held-out scenes."""
    rows = [
        [key, int(v.get("count", 0)) or "-", round(v["accuracy"], 3),
         f"[{v['low']:.3f}, {v['high']:.3f}]" if "low" in v else "(mean of categories)",
         round(real[key]["accuracy"], 3) if key in real else "-"]
        for key, v in shapes.items()
    ]  # fmt: skip
    return {
        "title": f"Compositional accuracy ({name})",
        "note": "GenEval-style: an analytic detector checks each sample against its caption's "
        "scene (count, shape, colour, position, binding); '/unseen' rows hold a (shape, colour) "
        "combination the training split never shows. 95% Wilson intervals.",
        "columns": ["category", "prompts", "accuracy", "95% interval", "real scenes"],
        "rows": rows,
    }
