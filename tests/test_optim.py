"""Optimizer kernels and learning-rate schedules (pipeline/train/optim.py), in process."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.errors import RecipeError
from pipeline.train.optim import (
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    lr_factor,
    resolve_kernel,
    trainer_schedule,
)


def _train(kernel: str, steps: int = 30) -> dict[str, torch.Tensor]:
    """A small MLP trained `steps` AdamW steps with `kernel` on fixed random batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, kernel=kernel))
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=data)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_and_foreach_kernels_match_the_reference_loop_to_rounding() -> None:
    reference = _train("loop")
    for kernel in ("fused", "foreach"):
        other = _train(kernel)
        for name, value in reference.items():
            # Same update rule, other summation order: float32 rounding only.
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_picks_fused_for_float_cpu_parameters() -> None:
    model = torch.nn.Linear(4, 4)
    assert resolve_kernel("auto", model) == "fused"
    assert resolve_kernel("loop", model) == "loop"
    assert build_optimizer(model, OptimConfig()).defaults["fused"] is True


@pytest.mark.parametrize(
    ("kind", "checks"),
    [
        # (step, expected factor) for max_steps 100, warmup 10, min_lr_ratio 0.1
        ("constant", [(0, 0.1), (9, 1.0), (10, 1.0), (99, 1.0)]),
        ("cosine", [(9, 1.0), (10, 1.0), (55, 0.55), (100, 0.1)]),
        ("linear", [(10, 1.0), (55, 0.55), (100, 0.1)]),
        # wsd: stable to step 80, then linear over the last 20 steps to 0.1
        ("wsd", [(10, 1.0), (79, 1.0), (80, 1.0), (90, 0.55), (100, 0.1)]),
    ],
)
def test_schedule_shapes(kind: str, checks: list[tuple[int, float]]) -> None:
    schedule = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    for step, expected in checks:
        assert lr_factor(step, schedule, 100) == pytest.approx(expected), (kind, step)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_trl_stages_get_the_same_schedule_from_the_trainer(kind: str) -> None:
    """The Trainer's scheduler built from our mapping agrees with lr_factor after warmup."""
    from transformers import get_scheduler

    schedule = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1)
    args = trainer_schedule(schedule, 100)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        args["lr_scheduler_type"], optimizer, num_warmup_steps=args["warmup_steps"],
        num_training_steps=100, scheduler_specific_kwargs=args.get("lr_scheduler_kwargs"),
    )  # fmt: skip
    trainer_lr = []
    for _ in range(100):
        trainer_lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (10, 30, 50, 79, 85, 99):
        assert trainer_lr[step] == pytest.approx(lr_factor(step, schedule, 100), abs=0.02), step


def test_impossible_schedules_are_one_line_errors() -> None:
    from pipeline.engine.config import validate_recipe

    stage = {"kind": "pretrain", "max_steps": 10, "schedule": {"kind": "wsd", "warmup_steps": 9}}
    with pytest.raises(RecipeError) as info:
        validate_recipe({"name": "x", "stages": {"pretrain": stage}})
    message = str(info.value)
    assert "\n" not in message and "overlaps the wsd decay" in message and "pretrain" in message
    stage["schedule"] = {"kind": "cosine", "warmup_steps": 10}
    with pytest.raises(RecipeError, match=r"warmup_steps \(10\) must be below max_steps \(10\)"):
        validate_recipe({"name": "x", "stages": {"pretrain": stage}})
