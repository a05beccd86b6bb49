"""What a stage hands the training loop (`Workload`) and what it gets back (`Trained`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from pipeline.train.ema import EMA

# loss(model, batch on the device, generator) -> (loss to backpropagate, extra metrics to log)
LossFn = Callable[..., tuple["torch.Tensor", dict[str, Any]]]


@dataclass
class Workload:
    """What a stage hands the loop.

    `train_batch(step, micro, rank, world)` and `val_batches(rank, world)` return host arrays
    (or tuples of them), the first dimension being the batch; `item` names what a batch holds
    ("sequences", "images") and `tokens_per_item`, when set, turns throughput into tokens/s.
    """

    model: torch.nn.Module
    loss: LossFn
    train_batch: Callable[[int, int, int, int], Any]
    val_batches: Callable[[int, int], Sequence[Any]]
    item: str
    wrap_classes: list[str]
    tokens_per_item: int | None = None
    ema_decay: float | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None  # per device; default: the device's, at the run's precision
    describe: str = ""  # the head of the start line, e.g. "llama (causal_lm): 3.30M params"
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's own summary metrics
    # Run with every validation, on every rank, in eval mode without grad: model -> metrics,
    # logged as val/<name> and kept in the summary as <name> (e.g. task accuracy).
    evaluators: list[Callable[[torch.nn.Module], dict[str, float]]] = field(default_factory=list)
    # A checkpoint of another run of the same model, optimizer and global batch to start from
    # when the stage has none of its own: its weights, optimizer state and step, then only the
    # schedule's decay (annealing from a stable phase).
    anneal_from: Path | None = None
    # Loading at scale: builds the model sharded as the launch trains it (FSDP2 shards, ZeRO-3
    # partitions) and streams a model directory's weights into it, so that no rank ever holds
    # the whole model (`sharded_load.load_sharded` bound to the directory); `model` is then a
    # twin on the meta device that only describes it (its counts, FLOPs and block classes).
    load_weights: Callable[[Accelerator], torch.nn.Module] | None = None


@dataclass
class Trained:
    """What the loop hands back: the prepared model, its EMA (or None) and summary metrics."""

    accelerator: Accelerator
    model: torch.nn.Module
    ema: EMA | None
    summary: dict[str, Any] = field(default_factory=dict)

    def ema_state_dict(self) -> dict[str, Any] | None:
        """The full state dict with the EMA weights, if any (gathered from shards; every rank
        calls this), under the model's own names (a compiled model's `_orig_mod.` dropped)."""
        accelerator, model, ema = self.accelerator, self.model, self.ema
        if ema is None:
            return plain_names(accelerator.get_state_dict(model))
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        try:
            # Copies: the state dict shares storage with the parameters restore() overwrites.
            state = accelerator.get_state_dict(model)
            copies = None if state is None else {k: v.detach().clone() for k, v in state.items()}
            return plain_names(copies)
        finally:
            ema.restore(model.parameters())


def plain_names(state_dict: dict[str, Any] | None) -> dict[str, Any] | None:
    """The state dict under the model's own names (None stays None: ZeRO-3 off rank 0)."""
    if state_dict is None:
        return None
    return {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
