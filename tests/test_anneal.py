"""WSD and annealing (pipeline/train/optim.py, `anneal_from` of the pretrain stage): a stage that
decays from a stable-phase checkpoint of a wsd run continues that run exactly when it starts
where the run's own decay starts, and decays from any earlier stable checkpoint; a checkpoint
outside the stable phase is a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.runner import run_recipe
from pipeline.engine.tracking import read_metrics
from pipeline.train.optim import ScheduleConfig, anneal_factor, lr_factor
from tests.helpers import tiny_recipe

LR, FLOOR = 2e-3, 0.1


def _recipe(run_dir: Path, anneal_step: int) -> dict[str, Any]:
    """A 12-step wsd pretrain (decay over the last 6) and a stage annealing from its step."""
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    pretrain = data["stages"]["pretrain"]
    pretrain |= {"max_steps": 12, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10,
                 "optim": {"lr": LR}, "schedule": {"kind": "wsd", "warmup_steps": 2,
                 "decay_fraction": 0.5, "min_lr_ratio": FLOOR}}  # fmt: skip
    data["stages"]["anneal"] = {**pretrain, "after": ["pretrain"],
                                "anneal_from": {"stage": "pretrain", "step": anneal_step}}  # fmt: skip
    return data


def _export_tensors(stage_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(stage_dir / "export" / "model.safetensors")


def _lrs(stage_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in read_metrics(stage_dir) if "train/lr" in r}


def test_wsd_anneal_from_the_decay_start_continues_the_run_bit_for_bit(tmp_path: Path) -> None:
    import torch

    run_recipe(validate_recipe(_recipe(tmp_path, anneal_step=6)))
    full, annealed = _export_tensors(tmp_path / "pretrain"), _export_tensors(tmp_path / "anneal")
    assert all(torch.equal(full[k], annealed[k]) for k in full)
    lrs, full_lrs = _lrs(tmp_path / "anneal"), _lrs(tmp_path / "pretrain")
    assert min(lrs) == 7  # the anneal stage trained steps 7..12 only
    assert all(lrs[s] == full_lrs[s] for s in lrs)
    assert lrs[12] == pytest.approx(LR * FLOOR)


def test_wsd_anneal_from_an_earlier_stable_checkpoint_decays_from_there(tmp_path: Path) -> None:
    import torch

    run_recipe(validate_recipe(_recipe(tmp_path, anneal_step=4)))
    lrs = _lrs(tmp_path / "anneal")
    assert sorted(lrs) == list(range(5, 13))
    for step, lr in lrs.items():  # the lr after `step` optimizer steps
        assert lr == pytest.approx(LR * anneal_factor(step, 4, 12, FLOOR))
    assert lrs[5] < LR and lrs[12] == pytest.approx(LR * FLOOR)
    full, annealed = _export_tensors(tmp_path / "pretrain"), _export_tensors(tmp_path / "anneal")
    assert not all(torch.equal(full[k], annealed[k]) for k in full)  # another decay, other weights


def test_wsd_anneal_outside_the_stable_phase_is_one_line(tmp_path: Path) -> None:
    data = _recipe(tmp_path, anneal_step=8)  # the run's decay starts at 6
    with pytest.raises(PipelineError) as info:
        run_recipe(validate_recipe(data))
    message = str(info.value)
    assert "\n" not in message
    assert "stages.anneal.anneal_from: step 8 is not in a stable phase of pretrain" in message
    data["stages"]["anneal"]["after"] = ["tokenize"]
    with pytest.raises(RecipeError, match="anneal_from.stage 'pretrain' must be listed in"):
        validate_recipe(data)


def test_wsd_schedule_is_warmup_constant_then_linear_decay() -> None:
    wsd = ScheduleConfig(kind="wsd", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=FLOOR)
    factors = [lr_factor(s, wsd, 12) for s in range(13)]
    assert factors[:2] == [0.5, 1.0] and factors[2:7] == [1.0] * 5
    assert factors[7:] == pytest.approx([1 - 0.9 * k / 6 for k in range(1, 7)])
    assert [anneal_factor(s, 6, 12, FLOOR) for s in range(6, 13)] == pytest.approx(factors[6:])
