"""Image classification baselines: MLP, CNN and ResNet on small images (default: 8x8 digits).

Every net trains for the same number of epochs on the same rows, in one process on the CPU or
the first GPU. A validation share of the training rows gives the per-epoch curves and early
stopping (best weights restored); the held-out test rows are scored once, by
pipeline.baselines.metrics, the same way as the classical classifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.baselines import plots
from pipeline.baselines.core import Job, Task
from pipeline.baselines.data import load_dataset, split_rows, subsample_rows
from pipeline.baselines.metrics import classification_metrics, confusion_matrix
from pipeline.baselines.training import (
    DeepOptions,
    EarlyStopping,
    TrainSettings,
    lr_factor,
    make_optimizer,
)
from pipeline.engine.errors import PipelineError
from pipeline.train.runtime import torch_threads


class VisionModel(TrainSettings):
    """One image net and how it trains."""

    net: Literal["mlp", "cnn", "resnet"]
    hidden: list[int] = Field([128], min_length=1, description="mlp: hidden layer widths")
    channels: list[int] = Field([16, 32], min_length=1, description="cnn/resnet: widths per stage")
    blocks: int = Field(1, ge=1, description="resnet: residual blocks per stage")
    dropout: float = Field(0.0, ge=0, lt=1)
    batch_norm: bool = False
    augment: bool = Field(False, description="random shifts of up to `shift` pixels")
    shift: int = Field(1, ge=1, description="largest augmentation shift in pixels")
    early_stopping: int | None = Field(
        None, ge=1, description="patience in epochs on validation accuracy; best weights kept"
    )


class VisionOptions(DeepOptions):
    """The training budget every net of the stage gets."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of training rows")


@dataclass(frozen=True)
class Images:
    """Scaled images [N, C, H, W] and labels, with train / validation / test rows."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def shift_images(images: Any, max_shift: int, generator: Any) -> Any:
    """Translate each image by a random offset in [-max_shift, max_shift]^2, zero-filled."""
    import torch

    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # [B, C, H + 2s, W + 2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    rows = (offsets[:, :1] + torch.arange(height))[:, :, None]  # [B, H, 1]
    cols = (offsets[:, 1:] + torch.arange(width))[:, None, :]  # [B, 1, W]
    picked = padded[torch.arange(batch)[:, None, None], :, rows, cols]  # [B, H, W, C]
    return picked.permute(0, 3, 1, 2)


class Vision(Task):
    """Image classifiers trained with torch; table: test metrics, parameters and epochs run."""

    Model = VisionModel
    Options = VisionOptions
    primary = "accuracy"
    columns = ("accuracy", "precision", "recall", "f1", "roc_auc", "params", "epochs")

    def load(self, job: Job) -> Images:
        import pipeline.baselines.nets  # noqa: F401 - torch loads here, not in a model's seconds

        cfg = job.config
        data = subsample_rows(load_dataset(cfg.dataset, cfg.target, True), cfg.max_rows, job.seed)
        if data.image_shape is None:
            raise PipelineError(
                f"stages.{job.stage}.dataset: {cfg.dataset} rows are not images; "
                f"use builtin:digits (or task: classification for tabular data)"
            )
        rest, test = split_rows(data.target, cfg.test_fraction, job.seed, stratify=True)
        fit, val = split_rows(data.target[rest], job.options.val_fraction, job.seed, True)
        scale = max(float(np.abs(data.features[rest]).max()), 1e-12)  # digits: 16 -> [0, 1]
        images = (data.features / scale).reshape(-1, 1, *data.image_shape).astype(np.float32)
        names = data.target_names or []
        return Images(images, data.target, names, rest[fit], rest[val], test)

    def describe(self, job: Job, data: Images) -> str:
        o = job.options
        return (
            f"{len(data.train)} training, {len(data.val)} validation and {len(data.test)} test "
            f"images of shape {tuple(data.images.shape[1:])}; every net gets {o.epochs} epochs "
            f"of batch {o.batch_size} (fewer with early stopping); metrics on the test images."
        )

    def evaluate(self, job: Job, data: Images, name: str, model: VisionModel) -> dict[str, Any]:
        with torch_threads(job.options.cpu_threads):
            return self.train(job, data, name, model)

    def train(self, job: Job, data: Images, name: str, model: VisionModel) -> dict[str, Any]:
        """Train one net for the stage's budget and score it on the test images."""
        import torch

        from pipeline.baselines.nets import build_vision_net, init_weights, num_params

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(job.seed)
        generator = torch.Generator().manual_seed(job.seed)
        net = build_vision_net(
            model.net, tuple(data.images.shape[1:]), len(data.class_names), hidden=model.hidden,
            channels=model.channels, blocks=model.blocks, dropout=model.dropout,
            batch_norm=model.batch_norm,
        ).to(device)  # fmt: skip
        init_weights(net, model.init)
        images = torch.from_numpy(data.images).to(device)
        labels = torch.from_numpy(data.labels).to(device)
        options = job.options
        batches_per_epoch = -(-len(data.train) // options.batch_size)
        total_steps = options.epochs * batches_per_epoch
        optimizer = make_optimizer(net.parameters(), model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, model)
        )
        stopper = EarlyStopping(model.early_stopping)
        history: list[dict[str, float]] = []
        train_rows = torch.from_numpy(data.train).to(device)
        for epoch in range(1, options.epochs + 1):
            net.train()
            losses = []
            order = train_rows[torch.randperm(len(train_rows), generator=generator).to(device)]
            for batch in order.split(options.batch_size):
                x = images[batch]  # [B, C, H, W]
                if model.augment:
                    x = shift_images(x.cpu(), model.shift, generator).to(device)
                loss = torch.nn.functional.cross_entropy(net(x), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if model.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), model.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            val_loss, val_accuracy = self.validate(net, images, labels, data.val)
            row = {
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": scheduler.get_last_lr()[0],
            }
            history.append({"epoch": epoch, **row})
            job.log_row(name, row, epoch=epoch)
            if stopper.update(val_accuracy, net, epoch):
                job.log.info("%s: early stop at epoch %d (best %d)", name, epoch, stopper.best_at)
                break
        stopper.restore(net)
        probabilities = self.predict(net, images[torch.from_numpy(data.test).to(device)])
        predicted = probabilities.argmax(axis=1)
        y_true = data.labels[data.test]
        job.save_arrays(name, y_true=y_true, y_pred=predicted, y_score=probabilities)
        k = len(data.class_names)
        metrics = classification_metrics(y_true, predicted, probabilities, k)
        return {
            "metrics": {**metrics, "params": num_params(net), "epochs": len(history)},
            "best_epoch": stopper.best_at,
            "history": history,
            "confusion_matrix": confusion_matrix(y_true, predicted, k),
        }

    @staticmethod
    def validate(net: Any, images: Any, labels: Any, rows: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on `rows` (eval mode, no gradients)."""
        import torch

        net.eval()
        index = torch.from_numpy(rows).to(images.device)
        with torch.no_grad():
            logits = net(images[index])
            loss = torch.nn.functional.cross_entropy(logits, labels[index]).item()
            accuracy = (logits.argmax(dim=1) == labels[index]).float().mean().item()
        return loss, accuracy

    @staticmethod
    def predict(net: Any, images: Any) -> np.ndarray:
        """Class probabilities [N, classes] in eval mode."""
        import torch

        net.eval()
        with torch.no_grad():
            return torch.softmax(net(images), dim=1).double().cpu().numpy()

    def sections(self, job: Job, data: Images, results: dict[str, dict[str, Any]]) -> list[dict]:
        curves, curves_rel = job.figure("training_curves.png")
        histories = {name: r["history"] for name, r in results.items()}
        plots.training_curves(
            curves, histories, ("train_loss", "val_loss", "val_accuracy"), "epoch"
        )
        matrices = {name: np.asarray(r["confusion_matrix"]) for name, r in results.items()}
        confusion, confusion_rel = job.figure("confusion_matrices.png")
        plots.confusion_grid(confusion, matrices, data.class_names, "test images")
        return [
            {
                "title": "training curves",
                "note": "Validation rows, per epoch.",
                "images": [curves_rel],
            },
            {"title": "confusion matrices", "images": [confusion_rel]},
        ]


VISION = Vision()
