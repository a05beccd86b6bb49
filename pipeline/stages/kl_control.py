"""An adaptive KL coefficient for GRPO/RLOO (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences"): beta moves in proportion to the logged KL's error from a target, so the
policy drifts from its reference at the rate the recipe asks, not at whatever rate a fixed beta
gives. The coefficient of every logged step is kept on disk so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.engine.manifest import atomic_write_json


def next_beta(beta: float, kl: float, target: float, steps: int, horizon: int) -> float:
    """Adaptive KL coefficient (Ziegler et al. 2019): proportional to the error from the target
    KL, clipped to +-20%, over a horizon of `horizon` steps; never below 1e-6, so the reference
    model stays in the loss."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return max(1e-6, beta * (1.0 + error * steps / horizon))


class KLControl:
    """An adaptive KL coefficient held to `target` (per-token KL as the trainer logs it), with
    the coefficient of every logged step kept on disk so a resumed run continues exactly."""

    def __init__(self, beta: float, target: float, horizon: int, path: Path) -> None:
        self.initial, self.target, self.horizon, self.path = beta, target, horizon, path
        self.betas: dict[int, float] = {}
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.betas = {int(step): float(beta) for step, beta in data.items()}

    def resume_at(self, step: int) -> float:
        """The coefficient in force after `step` (the start value before any update); later
        values, and all of them when the run starts at step 0, were another run's."""
        self.betas = {s: b for s, b in self.betas.items() if 0 < s <= step}
        return self.betas[max(self.betas)] if self.betas else self.initial

    def update(self, step: int, since: int, kl: float, beta: float) -> float:
        new = next_beta(beta, kl, self.target, since, self.horizon)
        self.betas = {s: b for s, b in self.betas.items() if s < step} | {step: new}
        return new

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {str(s): b for s, b in sorted(self.betas.items())})
