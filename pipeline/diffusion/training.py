"""What the vae and diffusion stages share: their loop settings and image data for the loop.

The loop itself is `pipeline.train.loop`; this module turns image shards into its batches:
training batches from `ImageShards.batch` (a pure function of seed, step and rank) and an equal
share of the first validation images per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.train.config import LoopConfig
from pipeline.train.loop import Trained, Workload
from pipeline.train.optim import OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    import torch

    from data_prep.images import ImageShards

# loss(model, images [B, C, H, W], labels [B], generator) -> (loss, extra metrics)
ImageLossFn = Callable[..., tuple["torch.Tensor", dict[str, Any]]]


class ImageOptimConfig(OptimConfig):
    """The optimiser keys of every stage with the image stages' defaults (no decay, beta2 0.999);
    a partial `optim:` block keeps them."""

    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (matrices only)")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW second-moment decay")


class ImageScheduleConfig(ScheduleConfig):
    """The schedule keys of every stage with the image stages' default warmup (50 steps)."""

    warmup_steps: int = Field(50, ge=0, description="steps of linear warmup from 0")


class ImageTrainingConfig(LoopConfig, StageConfig):
    """Batch, steps, optimiser, EMA and checkpointing of an image-model training stage."""

    micro_batch_size: int = Field(64, ge=1, description="images per rank per micro step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    optim: ImageOptimConfig = Field(default_factory=ImageOptimConfig, description="AdamW settings")
    schedule: ImageScheduleConfig = Field(
        default_factory=ImageScheduleConfig, description="learning-rate schedule"
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads per process on a CPU; default: torch's/launcher's"
    )
    log_every: int = Field(25, ge=1, description="optimizer steps between logged rows")
    eval_every: int = Field(250, ge=1, description="optimizer steps between validation passes")
    eval_batches: int = Field(2, ge=1, description="validation micro batches per rank")
    checkpoint_every: int = Field(250, ge=1, description="optimizer steps between checkpoints")

    distributed = True


def train_images(
    ctx: StageContext,
    cfg: ImageTrainingConfig,
    model: torch.nn.Module,
    loss_fn: ImageLossFn,
    data: tuple[ImageShards, ImageShards],
    ema_decay: float | None,
    wrap_classes: list[str],
) -> Trained:
    """Train `model` on the (train, val) shards with the shared loop."""
    from pipeline.train.loop import train

    train_split, val_split = data
    mb, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    params = sum(p.numel() for p in model.parameters())

    def train_batch(step: int, micro: int, rank: int, world: int) -> Any:
        return train_split.batch(ctx.seed, step, rank, world, mb, micro, accum)

    def val_batches(rank: int, world: int) -> list[Any]:
        rows = _val_rows(len(val_split), cfg.eval_batches * mb, world, rank)
        return [val_split.take(part.numpy()) for part in rows.split(mb)]

    work = Workload(
        model=model,
        loss=lambda m, batch, generator: loss_fn(m, *batch, generator),
        train_batch=train_batch,
        val_batches=val_batches,
        item="images",
        wrap_classes=wrap_classes,
        ema_decay=ema_decay,
        describe=f"{params / 1e6:.2f}M params",
        summary={"params": params},
    )
    return train(ctx, cfg, work)


def _val_rows(num_images: int, per_rank: int, world: int, rank: int) -> torch.Tensor:
    """This rank's validation rows: an equal share of the first images of the val split."""
    import torch

    usable = min(num_images, per_rank * world) // world * world
    if usable == 0:
        raise PipelineError(
            f"the val split has {num_images} images, fewer than the {world} ranks; "
            f"raise val_fraction in the images stage"
        )
    return torch.arange(usable)[rank::world]
