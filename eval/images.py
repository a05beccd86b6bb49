"""Image evaluation: the `image_eval` stage's class-conditional evaluation (the stage itself is
eval/image_eval.py) and the metric functions it shares with text-to-image evaluation
(eval/images_text.py) and the baselines.

Features come from a small CNN classifier trained on the real training split (no downloaded
Inception weights), so the scores are comparable only within this project, and only between
runs on the same data. Images are float arrays in [-1, 1], shape [N, C, H, W].

- `frechet_distance` (FD): distance between Gaussians fitted to real and generated features.
- `kid`: unbiased squared MMD with a cubic polynomial kernel, averaged over subsets.
- `precision_recall`: k-NN manifold precision (fraction of samples inside the real manifold)
  and recall (fraction of real images inside the samples' manifold), Kynkaanniemi et al. 2019.
- class accuracy: the classifier's agreement with the labels samples were conditioned on.
- `nearest_neighbour`: pixel distance of each sample to its closest training image; compared
  with held-out images' distances it flags memorisation (ratio well below 1 = copies).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pipeline.engine.config import StageConfig, Strict
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import PlanView

if TYPE_CHECKING:
    import torch

Sampler = Literal["ddpm", "ddim", "dpm++", "euler", "heun"]
DEFAULT_SAMPLERS = {"flow": [("euler", 20)], "ddpm": [("dpm++", 20)]}


class SamplerSpec(Strict):
    """One sampler to time and score."""

    sampler: Sampler
    steps: int = Field(ge=1, description="denoising steps (model evaluations for all but heun)")
    samples_per_class: int | None = Field(None, ge=1, description="default: the stage's")


class Config(StageConfig):
    """Score the upstream diffusion stage's export against the images stage's real images."""

    kind: Literal["image_eval"] = "image_eval"
    samplers: list[SamplerSpec] = Field(
        [], description="default: euler 20 steps (flow models), dpm++ 20 steps (ddpm models)"
    )
    guidance_scale: float = Field(2.0, ge=0, description="classifier-free guidance; 1 = none")
    samples_per_class: int = Field(50, ge=1)
    batch_size: int = Field(500, ge=1, description="images per sampling batch")
    max_real_images: int = Field(5000, ge=10, description="real train images used for scoring")
    classifier_epochs: int = Field(20, ge=1, description="epochs of the feature classifier")
    knn_k: int = Field(3, ge=1, description="k of the precision/recall manifolds")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on a CPU (1 suits small models on shared CPUs)"
    )
    grid_columns: int = Field(8, ge=1, description="samples per class in the grid PNGs")
    text_prompts: int = Field(
        300, ge=1, description="text-to-image models: held-out captions, one sample each"
    )


# ---------------------------------------------------------------------------------------------
# Reusable pieces: feature classifier, metrics, grids


def train_feature_classifier(
    images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 20, device: str = "cpu"
) -> torch.nn.Module:
    """A small CNN trained to classify `images`; its penultimate layer gives the features."""
    import torch
    from torch import nn

    channels, num_classes, width = images.shape[1], int(labels.max()) + 1, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 64), nn.GELU(),
        )  # fmt: skip
        net = nn.Sequential(body, nn.Linear(64, num_classes)).to(device)
    x, y = torch.from_numpy(np.asarray(images, np.float32)), torch.from_numpy(labels.astype(int))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=order).split(64):
            loss = nn.functional.cross_entropy(net(x[rows].to(device)), y[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def features(classifier: torch.nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features [N, 64] (float64) of images [N, C, H, W] in [-1, 1]."""
    return _apply(classifier[0], images, batch_size).astype(np.float64)


def predict(classifier: torch.nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The classifier's predicted class of each image."""
    return _apply(classifier, images, batch_size).argmax(axis=1)


def _apply(net: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    device = next(net.parameters()).device
    with torch.no_grad():
        return np.concatenate(
            [
                net(torch.from_numpy(np.asarray(images[i : i + batch_size], np.float32)).to(device))
                .float()
                .cpu()
                .numpy()
                for i in range(0, len(images), batch_size)
            ]
        )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2) of features a [N, D] and b [M, D]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularise as pytorch-fid does
        eye = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root))
    return float(max(value, 0.0))


def kid(
    a: np.ndarray, b: np.ndarray, subset_size: int = 1000, num_subsets: int = 50, seed: int = 0
) -> float:
    """Kernel inception distance: mean unbiased MMD^2 over random subsets, kernel (x.y/d + 1)^3.

    Both sets are divided by their pooled root mean square first, so that x.y/d is of order 1 as
    for Inception features; raw classifier features make the cubic kernel's estimate mostly noise.
    """
    scale = np.sqrt((np.concatenate([a, b]) ** 2).mean()) or 1.0
    a, b = a / scale, b / scale
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(a), len(b))
    scores = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        dim = x.shape[1]
        kxx, kyy, kxy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = size * (size - 1)
        mmd = (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
        scores.append(mmd - 2 * kxy.mean())
    return float(np.mean(scores))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall of fake features against real ones."""
    from scipy.spatial.distance import cdist

    def radii(points: np.ndarray) -> np.ndarray:
        distances = cdist(points, points)
        return np.sort(distances, axis=1)[:, min(k, len(points) - 1)]  # column 0 is the point

    fake_to_real = cdist(fake, real)  # [M, N]
    real_to_fake = fake_to_real.T
    precision = (fake_to_real <= radii(real)[None, :]).any(axis=1).mean()
    recall = (real_to_fake <= radii(fake)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def nearest_neighbour(
    queries: np.ndarray, references: np.ndarray, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference, pixel L2 over flattened images."""
    from scipy.spatial.distance import cdist

    refs = references.reshape(len(references), -1)
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        d = cdist(queries[start : start + chunk].reshape(-1, refs.shape[1]), refs)
        indices.append(d.argmin(axis=1))
        distances.append(d[np.arange(len(d)), indices[-1]])
    return np.concatenate(distances), np.concatenate(indices)


def save_grid_png(images: np.ndarray, path: Path, nrow: int, cell_pixels: int = 48) -> None:
    """Save images [N, C, H, W] in [-1, 1] as a PNG grid, `nrow` images per row, upscaled."""
    from PIL import Image

    count, channels, height, width = images.shape
    scale = max(1, cell_pixels // max(height, width))
    rows, pad = -(-count // nrow), 1
    grid = np.ones((channels, rows * (height + pad) + pad, nrow * (width + pad) + pad))
    for i, image in enumerate(np.clip(images, -1, 1)):
        top, left = pad + (i // nrow) * (height + pad), pad + (i % nrow) * (width + pad)
        grid[:, top : top + height, left : left + width] = (image + 1) / 2
    pixels = np.rint(grid * 255).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    mode_pixels = pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mode_pixels).save(path, format="PNG")


# ---------------------------------------------------------------------------------------------
# The stage


class Scorer:
    """Scores image sets against the real train split with one feature classifier."""

    def __init__(
        self, train: tuple[np.ndarray, np.ndarray], val: np.ndarray, cfg: Config, seed: int
    ):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.train_images, self.train_labels = train
        self.knn_k, self.seed = cfg.knn_k, seed
        self.classifier = train_feature_classifier(
            self.train_images, self.train_labels, seed, cfg.classifier_epochs, device
        )
        self.train_features = features(self.classifier, self.train_images)
        # Held-out images' distance to the training set: what "not a copy" looks like.
        self.val_nn_median = float(np.median(nearest_neighbour(val, self.train_images)[0]))

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """FD, KID, precision, recall, class accuracy and nearest-neighbour ratio of images."""
        feats = features(self.classifier, images)
        precision, recall = precision_recall(self.train_features, feats, self.knn_k)
        nn_median = float(np.median(nearest_neighbour(images, self.train_images)[0]))
        return {
            "fd": frechet_distance(self.train_features, feats),
            "kid": kid(self.train_features, feats, seed=self.seed),
            "precision": precision,
            "recall": recall,
            "class_accuracy": float((predict(self.classifier, images) == labels).mean()),
            "nn_distance": nn_median,
            "nn_ratio": nn_median / self.val_nn_median,
        }


def generate(
    pipe: Any, spec: SamplerSpec, labels: np.ndarray, cfg: Config, seed: int
) -> tuple[np.ndarray, float]:
    """(images [N, C, H, W] in [-1, 1], seconds) for `labels` with one sampler."""
    import torch

    pipe.use_sampler(spec.sampler)
    out, started = [], time.perf_counter()
    for i, start in enumerate(range(0, len(labels), cfg.batch_size)):
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        batch = pipe(
            class_labels=labels[start : start + cfg.batch_size].tolist(),
            num_inference_steps=spec.steps,
            guidance_scale=cfg.guidance_scale,
            generator=generator,
            output_type="pt",
        ).images
        out.append(batch.cpu().numpy() * 2 - 1)
    return np.concatenate(out).astype(np.float32), time.perf_counter() - started


def evaluate(ctx: StageContext, cfg: Config) -> None:
    """The stage's work for a class-conditional export (eval/image_eval.py runs it)."""
    import torch

    from data_prep.images import ImageShards
    from eval.image_report import write_outputs
    from pipeline.diffusion.class_conditional_pipeline import ClassConditionalPipeline

    export, images_dir = ctx.input("diffusion").path, ctx.input("images").path
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = ClassConditionalPipeline.from_pretrained(export)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    specs = sampler_specs(ctx, cfg, pipe.config.objective)
    train, val = ImageShards(images_dir, "train"), ImageShards(images_dir, "val")
    if train.num_classes != pipe.config.num_classes:
        raise PipelineError(
            f"stages.{ctx.name}: the model has {pipe.config.num_classes} classes, the images "
            f"stage {train.num_classes}; evaluate against the images the model was trained on"
        )
    val_images, val_labels = subset(val, cfg.max_real_images, ctx.seed)
    scorer = Scorer(subset(train, cfg.max_real_images, ctx.seed), val_images, cfg, ctx.seed)
    rows = reference_rows(scorer, val_images, val_labels, ctx.seed)
    sections_images, summary = [], {"classifier_val_accuracy": rows[0][1]["class_accuracy"]}
    for spec in specs:
        per_class = spec.samples_per_class or cfg.samples_per_class
        labels = np.repeat(np.arange(train.num_classes), per_class)
        images, seconds = generate(pipe, spec, labels, cfg, ctx.seed)
        metrics = {**scorer.score(images, labels), "images_per_second": len(images) / seconds}
        name = f"{spec.sampler}_{spec.steps}"
        rows.append((name, metrics, spec.steps, len(images)))
        summary.update({f"{name}/{k}": v for k, v in metrics.items()})
        if len(sections_images) == 0:
            summary.update(metrics)  # the first sampler's figures are the headline ones
            nearest_figure(scorer, images, per_class, ctx.export_dir / "nearest.png")
        columns = min(cfg.grid_columns, per_class)
        grid = images.reshape(train.num_classes, per_class, *images.shape[1:])[:, :columns]
        save_grid_png(
            grid.reshape(-1, *images.shape[1:]), ctx.export_dir / f"grid_{name}.png", columns
        )
        sections_images.append(f"grid_{name}.png")
        ctx.log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    write_outputs(ctx, cfg.guidance_scale, rows, sections_images, train.classes, summary)


def sampler_specs(ctx: StageContext, cfg: Config, objective: str) -> list[SamplerSpec]:
    """The stage's samplers (default: the objective's), each one that fits the objective."""
    from pipeline.diffusion.class_conditional_pipeline import OBJECTIVE_SAMPLERS

    specs = cfg.samplers or [
        SamplerSpec(sampler=s, steps=n) for s, n in DEFAULT_SAMPLERS[objective]
    ]
    for i, spec in enumerate(specs):
        if spec.sampler not in OBJECTIVE_SAMPLERS[objective]:
            raise PipelineError(
                f"stages.{ctx.name}.samplers.{i}: sampler {spec.sampler} does not fit a "
                f"{objective} model; use {' or '.join(OBJECTIVE_SAMPLERS[objective])}"
            )
    return specs


def subset(shards: Any, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `count` images of a split, a seeded random choice (splits may be class-sorted)."""
    rows = np.random.default_rng(seed).permutation(len(shards))[:count]
    return shards.take(np.sort(rows))


def reference_rows(
    scorer: Scorer, val_images: np.ndarray, val_labels: np.ndarray, seed: int
) -> list[tuple]:
    """Rows for held-out real images (the floor) and uniform noise (the ceiling)."""
    noise = np.random.default_rng(seed).uniform(-1, 1, val_images.shape).astype(np.float32)
    return [
        ("real val images", scorer.score(val_images, val_labels), None, len(val_images)),
        ("uniform noise", scorer.score(noise, val_labels), None, len(noise)),
    ]


def nearest_figure(scorer: Scorer, images: np.ndarray, per_class: int, path: Path) -> None:
    """Top row: the first sample of each class; bottom row: its nearest training image."""
    firsts = images[::per_class]
    _, nearest = nearest_neighbour(firsts, scorer.train_images)
    save_grid_png(np.concatenate([firsts, scorer.train_images[nearest]]), path, len(firsts))


def sampler_problems(view: PlanView) -> list[str]:
    """Samplers that do not fit the upstream diffusion stage's objective (known before training)."""
    from pipeline.diffusion.class_conditional_pipeline import OBJECTIVE_SAMPLERS

    diffusion = view.first("diffusion")
    if diffusion is None:
        return []
    objective = diffusion.config.objective.kind
    allowed = OBJECTIVE_SAMPLERS[objective]
    return [
        f"stages.{view.name}.samplers.{i}.sampler: {spec.sampler} does not fit stage "
        f"{diffusion.stage!r}, a {objective} model; use one of {', '.join(allowed)}"
        for i, spec in enumerate(view.config.samplers)
        if spec.sampler not in allowed
    ]
