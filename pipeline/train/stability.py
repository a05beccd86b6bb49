"""Stability guards of the training loop: non-finite steps and loss-spike rollback.

A step whose loss or gradient norm is NaN/inf on any rank is skipped on every rank and counted;
`max_bad_steps` of them in a row stop the stage (`NonFiniteGuard`).

Loss-spike rollback (`SpikeGuard`): detect a spike, go back to the last good checkpoint, skip
its batches.
A spike is a step whose loss (averaged over ranks, so every rank decides alike) lies more than
`threshold` standard deviations above the mean of the last `window` trained steps. The loop
then leaves that step's update out, reloads the newest checkpoint written before the first
batch to skip, and replays from there with the batches of steps
[spike - skip_before, spike] left out: batches are a pure function of (seed, step, rank), so a
skip is a recorded list of step numbers, and the replay is otherwise the run as it was. The
learning rate may be lowered for the rest of the run (`lr_factor`). The guard's state (loss
history, skipped steps, lr scale, rollback count) travels in every checkpoint's meta, so a
resumed run decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import torch


class SpikeConfig(Strict):
    """When a loss spike rolls the run back, and what the rollback changes."""

    rollback: bool = Field(
        False,
        description="on a loss spike, reload the last good checkpoint, skip the spike's batches "
        "and continue",
    )
    window: int = Field(50, ge=5, description="trained steps of loss history for mean and std")
    threshold: float = Field(
        6.0, gt=0, description="a spike: loss above the window's mean by this many std"
    )
    skip_before: int = Field(
        0, ge=0, description="batches before the spike step that are skipped with it"
    )
    lr_factor: float = Field(
        1.0, gt=0, le=1, description="multiplies the learning rate after each rollback"
    )
    max_rollbacks: int = Field(
        3, ge=1, description="rollbacks in a run; one more spike stops the stage"
    )


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps (skipped on every rank) and when a streak of them stops."""

    max_bad_steps: int
    streak: int = 0  # non-finite steps in a row up to now
    count: int = 0  # in this run (restarts at 0 after a resume)

    def skipped(self) -> dict[str, float]:
        """Record a skipped step; the metrics row that says so."""
        self.streak += 1
        self.count += 1
        return {"train/skipped_step": 1.0, "train/skipped_steps": self.count}

    def exhausted(self) -> bool:
        return self.streak >= self.max_bad_steps

    def stop(self, stage: str, done: int, last_checkpoint: str | None) -> PipelineError:
        """The one-line error that stops the stage, naming the step and the last good checkpoint."""
        last = last_checkpoint or "none (the stage starts over)"
        return PipelineError(
            f"stages.{stage}: {self.streak} optimizer step(s) in a row up to step {done} had a "
            f"non-finite loss or gradient norm; last good checkpoint: {last}; lower optim.lr, "
            f"lengthen schedule.warmup_steps or check the data of those steps, then rerun (it "
            f"resumes from that checkpoint)"
        )


@dataclass
class SpikeGuard:
    """The detector's state between steps; `state()` goes into checkpoint meta."""

    cfg: SpikeConfig
    history: list[float] = field(default_factory=list)  # losses of the last `window` steps
    skip: set[int] = field(default_factory=set)  # 0-based steps whose batches are left out
    lr_scale: float = 1.0
    rollbacks: int = 0

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against a full window of history (non-finite: not a spike,
        the non-finite guard handles it)."""
        if len(self.history) < self.cfg.window or not math.isfinite(loss):
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.cfg.threshold * max(std, 1e-8 * max(1.0, abs(mean)))

    def record(self, loss: float) -> None:
        self.history = [*self.history, loss][-self.cfg.window :]

    def plan(self, step: int, loss: float, stage: str) -> range:
        """The steps whose batches a rollback for a spike at `step` leaves out; a spike past
        the rollback budget stops the stage."""
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise PipelineError(
                f"stages.{stage}: loss spike at step {step + 1} ({loss:.4f}) after "
                f"{self.rollbacks} rollback(s); raise spike.max_rollbacks, lower optim.lr or "
                f"check the data of that step, then rerun (it resumes from the last checkpoint)"
            )
        return range(max(0, step - self.cfg.skip_before), step + 1)

    def rolled_back(
        self, step: int, loss: float, skipped: range, found: tuple[Path, dict[str, Any]] | None
    ) -> tuple[dict[str, float], str]:
        """Record a rollback to `found` (None: no checkpoint before the spike); the metrics
        event and the log line that say so. Steps in both are 1-based, as in every log."""
        mean = sum(self.history) / len(self.history)
        self.rollbacks += 1
        self.skip.update(skipped)
        target = -1 if found is None else int(found[1]["step"])
        event = {"event/rollback": 1.0, "rollback/loss": loss, "rollback/window_mean": mean,
                 "rollback/to_step": target, "rollback/skipped_from": skipped.start + 1,
                 "rollback/skipped_to": step + 1}  # fmt: skip
        where = f"rolled back to {found[0].name}" if found else "no checkpoint to roll back to"
        message = (
            f"step {step + 1}: loss {loss:.4f} is a spike (mean of the last {len(self.history)} "
            f"steps {mean:.4f}); {where}, skipping the batches of steps "
            f"{skipped.start + 1}..{step + 1}"
        )
        return event, message

    def rescale(self, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Lower the learning rate by lr_factor from now on (the current step included)."""
        self.lr_scale *= self.cfg.lr_factor
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(
            groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)

    def summary(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks, "rollback_skipped_batches": len(self.skip)}

    def state(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "skip": sorted(self.skip),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
        }

    def load(self, state: dict[str, Any] | None, history_only: bool = False) -> None:
        """Restore from checkpoint meta; after a rollback only the history goes back in time."""
        if not state:
            return
        self.history = list(state["history"])
        if not history_only:
            self.skip = set(state["skip"])
            self.lr_scale = float(state["lr_scale"])
            self.rollbacks = int(state["rollbacks"])

    def scaled(self, factor: Any) -> Any:
        """The schedule's lr factor times this guard's (current) lr scale."""
        return lambda step: factor(step) * self.lr_scale
