"""Generative baselines on the images stage's shards: VAE, GAN, RealNVP flow, PixelCNN, and the
diffusion stages' exports, all scored by the same code.

Pixels are discrete: the uint8 shards requantised to `levels` grey levels (17 for the digits is
lossless: scikit-learn's digits hold 0..16). Bits/dim are -log2 p per pixel on the test images
(the images stage's val split): exact for the PixelCNN, an upper bound for the flow (uniform
dequantisation) and the VAE (negative ELBO); a uniform model scores log2(levels). Every model's
samples, on the same pixel grid, get the same scores from eval/images.py: Frechet distance, KID
and precision/recall on the shared feature classifier's features against the test images.
A diffusion row (`from_stage`) samples that stage's export; its training time is the stage's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from eval import images as image_eval
from pipeline.baselines import plots
from pipeline.baselines.core import Job, Task
from pipeline.baselines.generative_config import (
    GRID_SIDE,
    SAMPLE_BATCH,
    GenerativeModel,
    GenerativeOptions,
    Pixels,
    unit,
)
from pipeline.baselines.generative_diffusion import (
    diffusion_input,
    sample_diffusion,
    sampler_problem,
)
from pipeline.baselines.training import lr_factor, make_optimizer
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import PlanView
from pipeline.train.runtime import torch_threads

LIKELIHOOD = {"vae": "ELBO bound", "flow": "dequantised bound", "pixelcnn": "exact"}


class Generative(Task):
    """Generative models: bits/dim where defined, sample quality and speed, training time."""

    Model = GenerativeModel
    Options = GenerativeOptions
    primary = "fd"
    higher_is_better = False
    columns = (
        "bits_per_dim", "likelihood", "fd", "kid", "precision", "recall",
        "samples_per_second", "train_seconds", "params",
    )  # fmt: skip

    def dataset_signature(self, config: Any) -> dict[str, Any]:
        return {"images": "the upstream images stage (its fingerprint covers the content)"}

    def load(self, job: Job) -> Pixels:
        """The images stage's shards, quantised, and the shared feature classifier."""
        from data_prep.images import ImageShards

        images = next(iter(job.inputs("images")), None)
        if images is None:
            raise PipelineError(no_images(job.stage))
        train, test = ImageShards(images.path, "train"), ImageShards(images.path, "val")
        for name, model in job.models.items():
            check_model(job, name, model, train.shape)
        if train.index.source != job.config.dataset or train.index.dtype != "uint8":
            raise PipelineError(
                f"stages.{job.stage}.dataset: {job.config.dataset}, but the upstream images stage "
                f"{images.stage!r} holds {train.index.dtype} {train.index.source}; set "
                f"dataset: {train.index.source}"
            )
        if len(test) < 10:
            raise PipelineError(
                f"stages.{images.stage}.val_fraction: {len(test)} val images, too few to score "
                f"samples against; raise it (e.g. 0.2)"
            )
        rows = np.random.default_rng(job.seed).permutation(len(train))[: job.config.max_rows]
        raw, labels = train.images[np.sort(rows)], train.labels[np.sort(rows)]
        levels = job.options.levels
        train_q, test_q = (
            np.rint(x * ((levels - 1) / 255)).astype(np.int64) for x in (raw, test.images)
        )
        lossless = bool((np.rint(train_q * (255 / (levels - 1))) == raw).all())
        with torch_threads(job.options.cpu_threads):
            scorer = feature_scorer(
                job, unit(train_q, levels), labels, unit(test_q, levels), test.labels
            )
        return Pixels(train_q, test_q, levels, lossless, *scorer)

    def plan_problems(self, view: PlanView) -> list[str]:
        """An images stage upstream, and each from_stage's sampler fitting that stage's objective."""
        problems = [] if view.first("images") else [no_images(view.name)]
        diffusion = {r.where: r for r in view.inputs.get("diffusion", [])}
        for name, spec in view.config.models.items():
            where = f"stages.{view.name}.models.{name}"
            if upstream := diffusion.get(f"{where}.from_stage"):
                model = GenerativeModel.model_validate(spec)
                if problem := sampler_problem(f"{where}.sampler", model, upstream):
                    problems.append(problem)
        return problems

    def describe(self, job: Job, data: Pixels) -> str:
        o, refs = job.options, data.references
        grid = "lossless" if data.lossless else "a lossy requantisation of the 8-bit pixels"
        return (
            f"{len(data.train)} training and {len(data.test)} test images (the images stage's "
            f"val split) of shape {data.train.shape[1:]}, pixels as {o.levels} grey levels "
            f"({grid}); a uniform model scores {math.log2(o.levels):.3f} bits/dim. Bits/dim "
            f"on the test images: PixelCNN exact, flow and VAE upper bounds "
            f"(dequantised, ELBO). FD/KID/precision/recall: {o.num_samples} samples per model "
            f"against the test images on the features of eval/images.py's classifier (trained "
            f"on the training images, test accuracy {data.classifier_accuracy:.3f}); for "
            f"reference, {min(o.num_samples, len(data.train))} real training images score FD "
            f"{refs['real training images']:.3g} and uniform noise {refs['uniform noise']:.3g}. "
            f"train_seconds: the training loop, or a diffusion stage's whole duration."
        )

    def evaluate(self, job: Job, data: Pixels, name: str, model: GenerativeModel) -> dict:
        with torch_threads(job.options.cpu_threads):
            if model.from_stage is not None:
                result, samples, seconds = sample_diffusion(job, data, name, model)
            else:
                result = self.train(job, data, name, model)
                samples, seconds = self.sample(job, result.pop("net"), data)
            result["metrics"].update(self.score(job, data, samples))
            result["metrics"]["samples_per_second"] = len(samples) / seconds
        job.save_arrays(name, samples=samples.astype(np.uint8))
        return result

    def train(self, job: Job, data: Pixels, name: str, model: GenerativeModel) -> dict[str, Any]:
        """Train one net on the training pixels; its test bits/dim (when it has a likelihood)."""
        import torch

        from pipeline.baselines.generative_nets import bits_per_dim, build_generative_net
        from pipeline.baselines.nets import init_weights, num_params

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(job.seed)
        order = torch.Generator().manual_seed(job.seed)
        sizes = (model.hidden, model.latent_dim, model.layers)
        net = build_generative_net(model.net, data.train.shape[1:], data.levels, *sizes)
        net.to(device)
        init_weights(net, model.init)
        train, test = (torch.from_numpy(a).to(device) for a in (data.train, data.test))
        epochs = model.epochs or job.options.epochs
        steps = epochs * -(-len(train) // job.options.batch_size)
        step_fn = Steps(net, model, steps, data.levels)
        history, started = [], time.perf_counter()
        for epoch in range(1, epochs + 1):
            net.train()
            rows = [step_fn(train[b]) for b in torch.randperm(len(train), generator=order).split(
                job.options.batch_size)]  # fmt: skip
            row = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            if model.net != "gan":
                row["test_bits_per_dim"] = bits_per_dim(net, test)
            history.append({"epoch": epoch, **row})
            job.log_row(name, row, epoch=epoch)
        seconds = time.perf_counter() - started
        likelihood = LIKELIHOOD.get(model.net)
        metrics = {
            "bits_per_dim": history[-1].get("test_bits_per_dim"),
            "likelihood": likelihood or "none",
            "train_seconds": seconds,
            "params": num_params(net),
            "epochs": epochs,
        }
        return {"metrics": metrics, "history": history, "net": net}

    @staticmethod
    def sample(job: Job, net: Any, data: Pixels) -> tuple[np.ndarray, float]:
        """(options.num_samples integer images, seconds) from a trained net, in eval mode."""
        import torch

        net.eval()
        generator = torch.Generator().manual_seed(job.seed + 1)
        started, out = time.perf_counter(), []
        for start in range(0, job.options.num_samples, SAMPLE_BATCH):
            count = min(SAMPLE_BATCH, job.options.num_samples - start)
            out.append(net.sample(count, generator).cpu().numpy())
        seconds = time.perf_counter() - started
        return np.concatenate(out).clip(0, data.levels - 1), seconds

    @staticmethod
    def score(job: Job, data: Pixels, samples: np.ndarray) -> dict[str, float]:
        """FD, KID and k-NN precision/recall of samples against the test images."""
        feats = image_eval.features(data.classifier, unit(samples, data.levels))
        precision, recall = image_eval.precision_recall(
            data.test_features, feats, job.options.knn_k
        )
        return {
            "fd": image_eval.frechet_distance(feats, data.test_features),
            "kid": image_eval.kid(feats, data.test_features, seed=job.seed),
            "precision": precision,
            "recall": recall,
        }

    def sections(self, job: Job, data: Pixels, results: dict[str, dict[str, Any]]) -> list[dict]:
        grids = {"real test images": data.test[: GRID_SIDE**2]}
        grids.update({name: job.arrays(name)["samples"][: GRID_SIDE**2] for name in results})
        path, relative = job.figure("samples.png")
        sample_figure(path, {k: unit(v, data.levels) for k, v in grids.items()}, job)
        sections = [
            {
                "title": "sample grids",
                "note": f"The first {GRID_SIDE**2} scored samples of each model; "
                "diffusion rows follow the labels 0, 1, 2, ... when conditional.",
                "images": [relative],
            }
        ]
        histories = {n: r["history"] for n, r in results.items() if r.get("history")}
        if histories:
            curves, curves_rel = job.figure("training_curves.png")
            keys = ("train_bits_per_dim", "test_bits_per_dim", "d_loss", "g_loss")
            plots.training_curves(curves, histories, keys, "epoch")
            note = "Per epoch; the flow's and the VAE's bits/dim are upper bounds."
            sections.append({"title": "training curves", "note": note, "images": [curves_rel]})
        return sections


class Steps:
    """Optimiser steps of one net: on the mean NLL per pixel, or a GAN's discriminator step then
    generator step (non-saturating loss, Adam with DCGAN's betas 0.5, 0.999)."""

    def __init__(self, net: Any, model: GenerativeModel, total_steps: int, levels: int):
        import torch

        self.net, self.model, self.levels = net, model, levels
        if model.net == "gan":
            adam = {"lr": model.lr, "betas": (0.5, 0.999), "weight_decay": model.weight_decay}
            parts = (net.discriminator, net.generator)
            self.optimizers = [torch.optim.Adam(part.parameters(), **adam) for part in parts]
        else:
            self.optimizers = [make_optimizer(net.parameters(), model)]
        self.schedules = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, total_steps, model))
            for o in self.optimizers
        ]

    def __call__(self, batch: Any) -> dict[str, float]:
        from pipeline.baselines.generative_nets import to_unit

        if self.model.net != "gan":
            loss = self.net.nll(batch).mean() / batch[0].numel()  # nats per pixel
            self._step(0, loss)
            return {"train_bits_per_dim": loss.item() / math.log(2)}
        fake = self.net.generate(len(batch))
        d_loss = self.net.discriminator_loss(to_unit(batch, self.levels), fake.detach())
        self._step(0, d_loss)
        g_loss = self.net.generator_loss(fake)
        self._step(1, g_loss)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}

    def _step(self, index: int, loss: Any) -> None:
        import torch

        optimizer = self.optimizers[index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.model.grad_clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.model.grad_clip)
        optimizer.step()
        self.schedules[index].step()


def feature_scorer(
    job: Job, train: np.ndarray, labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray
) -> tuple[Any, np.ndarray, float, dict[str, float]]:
    """eval/images.py's classifier trained on the training images; the test images' features,
    its test accuracy, and the FD of real training images and of uniform noise (references)."""
    import torch

    import pipeline.baselines.generative_nets  # noqa: F401 - torch loads here, not in a model's seconds

    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = job.options.classifier_epochs
    classifier = image_eval.train_feature_classifier(train, labels, job.seed, epochs, device)
    test_features = image_eval.features(classifier, test)
    accuracy = float((image_eval.predict(classifier, test) == test_labels).mean())
    rng = np.random.default_rng(job.seed)
    real = train[rng.permutation(len(train))[: job.options.num_samples]]
    noise = rng.uniform(-1, 1, real.shape).astype(np.float32)
    references = {
        name: image_eval.frechet_distance(image_eval.features(classifier, x), test_features)
        for name, x in (("real training images", real), ("uniform noise", noise))
    }
    return classifier, test_features, accuracy, references


def no_images(stage: str) -> str:
    """The one-line error (at plan time and at run time) for a stage without images upstream."""
    return (
        f"stages.{stage}: task generative needs an upstream stage that makes images (images); "
        f"add one to its `after:` list"
    )


def check_model(job: Job, name: str, model: GenerativeModel, shape: tuple[int, ...]) -> None:
    """A gan gets square 2^k images; a from_stage is a finished diffusion stage upstream whose
    objective fits the sampler."""
    side = shape[1]
    if model.net == "gan" and (shape[2] != side or side < 4 or side & (side - 1)):
        raise PipelineError(
            f"{job.where(name, 'net')}: gan needs square images of 4, 8, 16... pixels, not "
            f"{side}x{shape[2]}; set image_size in the images stage"
        )
    if model.from_stage is None:
        return
    problem = sampler_problem(job.where(name, "sampler"), model, diffusion_input(job, name))
    if problem:
        raise PipelineError(problem)


def sample_figure(path: Any, grids: dict[str, np.ndarray], job: Job) -> None:
    """One labelled panel per model: its grid PNG (eval.images.save_grid_png, also exported)."""
    from matplotlib.figure import Figure
    from PIL import Image

    columns = min(len(grids), 4)
    rows = -(-len(grids) // columns)
    figure = Figure(figsize=(3 * columns, 3.2 * rows), dpi=90, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, images) in zip(axes, grids.items(), strict=False):
        grid_path, _ = job.figure(f"samples_{name.replace(' ', '_')}.png")
        image_eval.save_grid_png(images, grid_path, GRID_SIDE)
        with Image.open(grid_path) as grid:
            ax.imshow(np.asarray(grid), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name)
    for ax in axes:
        ax.set_axis_off()
    figure.savefig(path, format="png")


GENERATIVE = Generative()
