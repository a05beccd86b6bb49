"""Preemption: a warning signal sets a flag; the training loop checkpoints and stops on it.

Slurm delivers the warning (`--signal`, SIGUSR1 by default) to every process of a job step. Each
worker records it here; the loop asks `requested()` at step boundaries, where every rank agrees on
the answer, so all ranks checkpoint the same step and leave together.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

SIGNAL = signal.SIGUSR1
_received = False


def _on_signal(signum: int, frame: object) -> None:
    global _received
    _received = True


def install() -> None:
    """Record the preemption signal in this process instead of dying of it."""
    signal.signal(SIGNAL, _on_signal)


def received() -> bool:
    """Whether this process got the signal (no collective; the loop agrees on it with others)."""
    return _received


def requested(accelerator: Accelerator) -> bool:
    """True on every rank when any rank received the signal (a collective: call it on all ranks)."""
    if accelerator.num_processes == 1:
        return _received
    import torch

    flag = torch.tensor([1.0 if _received else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
