"""Exponential moving average of parameters, checkpointed with the rest of the training state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class EMA:
    """Exponential moving average of parameters, decay warming up as (1 + n) / (10 + n).

    Works on whatever the engine holds (full tensors under DDP, shards under FSDP); has the
    state_dict / load_state_dict pair Accelerate checkpoints.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in parameters]
        self._stored: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameter, for every parameter."""
        import torch

        self.num_updates += 1
        weight = 1 - self.current_decay()
        with torch.no_grad():
            for shadow, param in zip(self.shadow, parameters, strict=True):
                shadow.lerp_(param.detach(), weight)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        import torch

        with torch.no_grad():
            for shadow, param in zip(self.shadow, parameters, strict=True):
                param.detach().copy_(shadow)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep the live parameters aside (restore() puts them back)."""
        self._stored = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        import torch

        assert self._stored is not None, "restore() without store()"
        with torch.no_grad():
            for kept, param in zip(self._stored, parameters, strict=True):
                param.detach().copy_(kept)
        self._stored = None

    def state_dict(self) -> dict[str, Any]:
        """Full tensors (gathered from FSDP shards: Accelerate calls this on every rank)."""
        full = [s.full_tensor() if _is_dtensor(s) else s for s in self.shadow]
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": full}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each rank keeps its own part of the full tensors, on its own device."""
        from torch.distributed.tensor import distribute_tensor

        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [
            distribute_tensor(
                full.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None
            )
            if _is_dtensor(mine)
            else full.to(mine.device)
            for full, mine in zip(state["shadow"], self.shadow, strict=True)
        ]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
