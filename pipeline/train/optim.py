"""AdamW and learning-rate schedules: the same `optim:` and `schedule:` keys in every training
stage (our loop and the TRL trainers), so `stages.<name>.optim.lr` means one thing everywhere."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.engine.config import Strict

if TYPE_CHECKING:
    import torch

Kernel = Literal["auto", "fused", "foreach", "loop"]


class OptimConfig(Strict):
    """AdamW settings; the same keys in every training stage (`stages.<name>.optim.lr`)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (matrices only)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    kernel: Kernel = Field(
        "auto",
        description="AdamW implementation: fused (one kernel per step), foreach (batched "
        "tensor ops), loop (per parameter, the reference); auto: fused where torch has it",
    )


class ScheduleConfig(Strict):
    """Learning-rate schedule: linear warmup, then constant, cosine, linear or warmup-stable-decay."""

    kind: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="after warmup: cosine or linear decay to min_lr_ratio x lr at max_steps; "
        "constant; wsd: constant, then linear decay over the last decay_fraction of the steps",
    )
    warmup_steps: int = Field(20, ge=0, description="steps of linear warmup from 0")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: share of max_steps spent decaying"
    )

    def check(self, max_steps: int) -> str | None:
        """What is wrong with this schedule over max_steps optimizer steps (None: nothing)."""
        if self.warmup_steps >= max_steps:
            return (
                f"schedule.warmup_steps ({self.warmup_steps}) must be below max_steps ({max_steps})"
            )
        if self.kind == "wsd" and self.warmup_steps > max_steps - decay_steps(self, max_steps):
            return (
                f"schedule: warmup_steps ({self.warmup_steps}) overlaps the wsd decay (the last "
                f"{decay_steps(self, max_steps)} of {max_steps} steps); lower one of them"
            )
        return None


def decay_steps(schedule: ScheduleConfig, max_steps: int) -> int:
    """Length of the decay phase of a wsd schedule."""
    return max(1, round(schedule.decay_fraction * max_steps))


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """The learning rate at `step` (0-based optimizer step) as a fraction of the peak."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    floor = schedule.min_lr_ratio
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "wsd":
        start = max_steps - decay_steps(schedule, max_steps)
        if step < start:
            return 1.0
        return 1 - (1 - floor) * min(1.0, (step - start) / decay_steps(schedule, max_steps))
    progress = (step - schedule.warmup_steps) / max(1, max_steps - schedule.warmup_steps)
    if schedule.kind == "linear":
        return 1 - (1 - floor) * min(1.0, progress)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return floor + (1 - floor) * cosine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or other vectors)."""
    # ZeRO-3 parameters built under zero.Init are partitioned already: their shape is ds_shape
    decay = [p for p in model.parameters() if p.requires_grad and len(_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(_shape(p)) < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_kernel(kernel: Kernel, model: torch.nn.Module) -> str:
    """fused where torch has a fused AdamW for every parameter's device and dtype, else foreach."""
    if kernel != "auto":
        return kernel
    import torch
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = _get_fused_kernels_supported_devices()
    fused = all(
        p.device.type in supported and torch.is_floating_point(p) for p in model.parameters()
    )
    return "fused" if fused else "foreach"


def build_optimizer(model: torch.nn.Module, opt: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `model` with decay on matrices only, in the chosen kernel."""
    import torch

    kernel = resolve_kernel(opt.kernel, model)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(
        param_groups(model, opt.weight_decay),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        **flags[kernel],
    )


def anneal_factor(step: int, start: int, max_steps: int, floor: float) -> float:
    """Annealing from a stable phase: the peak lr at `start`, then linear decay to `floor` at
    max_steps (the decay of a wsd schedule whose decay begins at `start`)."""
    return 1 - (1 - floor) * min(1.0, max(0, step - start) / max(1, max_steps - start))


def lambda_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: ScheduleConfig,
    max_steps: int,
    anneal_from: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR; `anneal_from` (a step): only the decay, starting there."""
    import torch

    if anneal_from is not None:
        floor = schedule.min_lr_ratio
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: anneal_factor(s, anneal_from, max_steps, floor)
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, max_steps))


def trainer_schedule(schedule: ScheduleConfig, max_steps: int) -> dict[str, Any]:
    """The same schedule as transformers.TrainingArguments fields (for the TRL trainers)."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio
    args: dict[str, Any] = {"warmup_steps": warmup}
    if schedule.kind == "constant":
        return {**args, "lr_scheduler_type": "constant_with_warmup"}
    if schedule.kind == "cosine":
        if not floor:
            return {**args, "lr_scheduler_type": "cosine"}
        kwargs: dict[str, Any] = {"min_lr_rate": floor}
        return {**args, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": kwargs}
    if schedule.kind == "linear" and not floor:
        return {**args, "lr_scheduler_type": "linear"}
    decay = decay_steps(schedule, max_steps) if schedule.kind == "wsd" else max_steps - warmup
    kwargs = {
        "num_decay_steps": decay,
        "decay_type": "linear",
        "min_lr_ratio": floor,
    }
    return {**args, "lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": kwargs}


def trainer_optimizer(opt: OptimConfig) -> dict[str, Any]:
    """AdamW settings as TrainingArguments fields; auto keeps the Trainer's default (fused).

    The Trainer has no switch between foreach and the per-parameter loop: both become
    `adamw_torch`, where torch picks foreach on GPUs and the loop on CPUs.
    """
    args: dict[str, Any] = {
        "learning_rate": opt.lr,
        "weight_decay": opt.weight_decay,
        "adam_beta1": opt.beta1,
        "adam_beta2": opt.beta2,
        "adam_epsilon": opt.eps,
    }
    if opt.kernel == "fused":
        args["optim"] = "adamw_torch_fused"
    elif opt.kernel in ("foreach", "loop"):
        args["optim"] = "adamw_torch"
    return args


def _shape(param: Any) -> tuple[int, ...]:
    """A parameter's full shape (a ZeRO-3 partition's shape is its slice's)."""
    return tuple(getattr(param, "ds_shape", param.shape))
