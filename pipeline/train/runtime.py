"""Process-level settings of training and evaluation: replayable random generators, threads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def replay_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a key such as (seed, step, rank, micro): same key, same draws."""
    import torch

    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads (None: unchanged), then restore the previous setting.

    Small models on a shared CPU run several times faster on one thread than on two.
    """
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def to_device(batch: Any, device: Any) -> Any:
    """Host arrays (or a tuple of them) as tensors on `device`."""
    import torch

    if isinstance(batch, tuple):
        return tuple(torch.from_numpy(part).to(device) for part in batch)
    return torch.from_numpy(batch).to(device)


def preemption_callback(accelerator: Accelerator, stage: str, every: int = 1) -> Any:
    """A TrainerCallback (the TRL stages) that checkpoints and stops at the next step boundary
    when any rank was asked to stop (Slurm's warning, a local Ctrl-C or SIGTERM): as our loop.
    With `every` > 1 it stops at the next multiple of `every` steps (GRPO's num_iterations: a
    generation batch is in memory only, so a checkpoint amid its updates would not resume
    exactly)."""
    from transformers import TrainerCallback

    from pipeline.engine import faults, preempt

    class Preemption(TrainerCallback):
        stopped_at: int | None = None
        asked = False

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            faults.point(stage, "mid_step")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.asked = preempt.requested(accelerator) or self.asked  # every rank, every step
            if (
                self.asked
                and state.global_step < state.max_steps
                and state.global_step % every == 0
            ):
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step

    return Preemption()
