"""What the deep-net baseline tasks share: optimiser and schedule settings, and early stopping.

Each task keeps its own short loop (epochs over images, steps over text windows); these pieces
are the parts that would otherwise be copied between them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field

from pipeline.engine.config import Strict


class DeepOptions(Strict):
    """Stage-wide settings of every deep baseline task."""

    cpu_threads: int = Field(
        1, ge=1, description="torch threads on a CPU; tiny nets run fastest (and share best) on one"
    )


class TrainSettings(Strict):
    """Per-model optimisation settings of a deep baseline."""

    init: Literal["default", "xavier", "he"] = Field(
        "default", description="weight init: torch default, Xavier (tanh/linear) or He (ReLU)"
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="sgd uses momentum 0.9")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="cosine: to 0 over training; step: x0.1 at 50% and 75%"
    )
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="linear warmup, share of training")
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0: no clipping")


def make_optimizer(params: Any, settings: TrainSettings) -> Any:
    """Adam, AdamW or SGD with momentum over `params`."""
    import torch

    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
        )
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(step: int, total_steps: int, settings: TrainSettings) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total_steps`."""
    warmup = int(settings.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if settings.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if settings.schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    return 1.0


class EarlyStopping:
    """Stop after `patience` evaluations without a better score; keep the best weights."""

    def __init__(self, patience: int | None, higher_is_better: bool = True) -> None:
        self.patience = patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.best: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_at = 0
        self.waited = 0

    def update(self, score: float, model: Any, at: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.best is None or self.sign * score > self.sign * self.best:
            self.best, self.best_at, self.waited = score, at, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.waited += 1
        return self.patience is not None and self.waited >= self.patience

    def restore(self, model: Any) -> None:
        """Load the best weights seen (when early stopping is on)."""
        if self.patience is not None and self.best_state is not None:
            model.load_state_dict(self.best_state)
