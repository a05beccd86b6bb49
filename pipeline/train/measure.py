"""Forward passes that measure, not train: validation loss (live and EMA weights), the resume
probe, and the stage's own evaluators (task accuracy, say), all in eval mode without gradients
under the training autocast, with FSDP2 parameters sharded again afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.train.distributed import reshard
from pipeline.train.runtime import replay_generator, to_device

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from pipeline.train.ema import EMA
    from pipeline.train.workload import Workload


@dataclass
class Measure:
    """What the loop measures with, on one rank; every rank calls each method (collectives)."""

    model: torch.nn.Module
    accelerator: Accelerator
    work: Workload
    seed: int
    rank: int
    world: int
    ema: EMA | None
    val: Sequence[Any]  # this rank's validation batches

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Eval mode, no grad, the training autocast; then back to training, FSDP2 resharded."""
        import torch

        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            reshard(self.model)
            self.model.train()

    def val_loss(self) -> float:
        """Mean loss over this rank's validation batches (fixed randomness), averaged over ranks."""
        import torch

        accelerator = self.accelerator
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum, count]
        with self.measuring():
            for i, raw in enumerate(self.val):
                batch = to_device(raw, accelerator.device)
                generator = replay_generator(self.seed, "val", self.rank, i)
                loss, _ = self.work.loss(self.model, batch, generator)
                size = len(raw[0]) if isinstance(raw, tuple) else len(raw)
                total += torch.stack([loss.double() * size, total.new_tensor(size)])
        total = accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()

    def ema_val_loss(self) -> float | None:
        """The validation loss of the EMA weights (swapped in, then the live ones restored)."""
        if self.ema is None:
            return None
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            return self.val_loss()
        finally:
            self.ema.restore(self.model.parameters())

    def probe_loss(self, step: int) -> float:
        """The loss of step `step`'s first micro batch under the current weights (no update,
        fixed randomness), averaged over ranks: saved with a checkpoint, recomputed on resume."""
        raw = self.work.train_batch(step, 0, self.rank, self.world)
        with self.measuring():
            generator = replay_generator(self.seed, "probe", step, self.rank)
            loss, _ = self.work.loss(self.model, to_device(raw, self.accelerator.device), generator)
        return self.accelerator.reduce(loss.detach().double(), reduction="mean").item()

    def evaluations(self) -> dict[str, float]:
        """The stage's evaluators on the live weights (every rank runs each one alike)."""
        metrics: dict[str, float] = {}
        model = self.accelerator.unwrap_model(self.model)  # generate() lives on the HF model
        for evaluate in self.work.evaluators:
            with self.measuring():
                metrics.update(evaluate(model))
        return metrics
