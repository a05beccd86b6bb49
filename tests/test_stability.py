"""Loss-spike rollback in the shared loop (pipeline/train/stability.py), in process: a poisoned
batch at a known step is detected, the run goes back to the last checkpoint, skips the batch and
ends better than a run that trained through it; ranks decide together; a resumed run keeps the
guard's record."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval.report import plot_losses, training_events
from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.tracking import read_metrics
from pipeline.train.stability import SpikeConfig, SpikeGuard
from tests.spawn import run_distributed

SPIKE_STEP = 16  # 0-based: optimizer step 17 trains on the poisoned batch


def _context(run_dir: Path, nproc: int, spike: dict[str, Any], **loop: Any) -> StageContext:
    stage = {"kind": "pretrain", "max_steps": 24, "micro_batch_size": 8, "log_every": 1,
             "eval_every": 100, "checkpoint_every": 4, "keep_checkpoints": 10,
             "optim": {"lr": 0.2, "weight_decay": 0.0, "grad_clip": 0.0}, "schedule": {"kind": "constant",
             "warmup_steps": 0}, "spike": spike, **loop}  # fmt: skip
    recipe = validate_recipe({"name": "spike", "run_dir": str(run_dir), "launch": {"nproc": nproc},
                              "tracking": {"mode": "disabled"}, "stages": {"pretrain": stage}})  # fmt: skip
    return StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint="toy")


def _rows(seed: list[int]) -> np.ndarray:
    """x ~ N(0, 1)^4 and the target y = x . (1, 2, 3, 4): a regression the model can solve."""
    x = np.random.default_rng(seed).normal(size=(8, 4)).astype(np.float32)
    return np.concatenate([x, x @ np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)], axis=1)


def _train(run_dir: Path, poisoned: dict[int, set[int]], nproc: int = 1, **spike: Any) -> dict:
    """Linear regression through the loop; the batches of `poisoned[rank]` steps have their
    targets multiplied by -300 (finite, a loss many std above the running mean). Unclipped, such
    a gradient dominates AdamW's moments for tens of steps: the way a real spike does damage."""
    import torch

    from pipeline.train.loop import Workload, train

    ctx = _context(run_dir, nproc, {"rollback": True, "window": 8, **spike})
    torch.manual_seed(0)

    def batch(step: int, micro: int, rank: int, world: int) -> np.ndarray:
        rows = _rows([step, micro, rank])
        if step in poisoned.get(rank, set()):
            rows[:, 4] *= -300
        return rows

    def loss(model: torch.nn.Module, rows: torch.Tensor, generator: object) -> tuple:
        return ((model(rows[:, :4]) - rows[:, 4:]) ** 2).mean(), {}

    val = [_rows([10_000, rank]) for rank in range(4)]
    work = Workload(torch.nn.Linear(4, 1), loss, batch, lambda rank, world: val, "rows", [])
    return train(ctx, ctx.config, work).summary  # type: ignore[arg-type]


def test_spike_rollback_skips_the_poisoned_batch_and_beats_training_through_it(
    tmp_path: Path,
) -> None:
    guarded = _train(tmp_path / "guarded", {0: {SPIKE_STEP}})
    through = _train(tmp_path / "through", {0: {SPIKE_STEP}}, rollback=False)
    clean = _train(tmp_path / "clean", {})
    assert guarded["rollbacks"] == 1 and guarded["rollback_skipped_batches"] == 1
    assert "rollbacks" not in through  # the guard was off
    assert clean["rollbacks"] == 0  # no false alarm on a clean run
    assert guarded["val_loss"] < through["val_loss"]
    events = [r for r in read_metrics(tmp_path / "guarded" / "pretrain") if "event/rollback" in r]
    assert len(events) == 1
    event = events[0]
    assert event["step"] == SPIKE_STEP + 1
    assert event["rollback/to_step"] == 16  # the newest checkpoint (every 4) before step 17
    assert (event["rollback/skipped_from"], event["rollback/skipped_to"]) == (17, 17)
    assert event["rollback/loss"] > 100 * event["rollback/window_mean"]
    # The report says so, and marks it on the loss curve with the lr schedule beside it.
    rows = read_metrics(tmp_path / "guarded" / "pretrain")
    assert training_events(rows) == [
        f"Loss spike at step 17 (loss {event['rollback/loss']:.4g} against a running mean of "
        f"{event['rollback/window_mean']:.4g}): rolled back to step 16, batches of steps 17..17 "
        "skipped."
    ]
    plot_losses(rows, tmp_path / "loss.png", title="pretrain")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    # Every step is logged once, in order, although steps 17.. were replayed.
    steps = [
        r["step"] for r in read_metrics(tmp_path / "guarded" / "pretrain") if "train/loss" in r
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_spike_rollback_skip_before_and_lr_factor_are_recorded_in_checkpoints(
    tmp_path: Path,
) -> None:
    import json

    _train(tmp_path, {0: {SPIKE_STEP}}, skip_before=2, lr_factor=0.5)
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    meta = json.loads((checkpoints / "step_00000024" / "meta.json").read_text())
    assert meta["spike"]["skip"] == [14, 15, 16] and meta["spike"]["lr_scale"] == 0.5
    # The rollback went back before the first skipped batch: the checkpoint after 12 steps.
    events = [r for r in read_metrics(tmp_path / "pretrain") if "event/rollback" in r]
    assert events[0]["rollback/to_step"] == 12
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path / "pretrain") if "train/lr" in r}
    assert lrs[12] == pytest.approx(0.2) and lrs[24] == pytest.approx(0.1)


def test_spike_rollback_resumed_run_keeps_the_guard_state_and_ends_identical(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import load_file

    first = _train(tmp_path, {0: {SPIKE_STEP}})
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    final = load_file(checkpoints / "step_00000024" / "model.safetensors")
    for step in (24, 20):  # as if killed after the checkpoint of step 20... and before it
        shutil.rmtree(checkpoints / f"step_{step:08d}")
    resumed = _train(tmp_path, {0: {SPIKE_STEP}})
    assert resumed["rollbacks"] == first["rollbacks"] == 1  # the skip came back with step 16's
    again = load_file(checkpoints / "step_00000024" / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in again.items())


def test_spike_rollback_past_max_rollbacks_stops_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as info:
        _train(tmp_path, {0: {SPIKE_STEP, SPIKE_STEP + 2}}, max_rollbacks=1)
    message = str(info.value)
    assert "\n" not in message and "loss spike at step 19" in message
    assert "spike.max_rollbacks" in message


def _two_rank_run(run_dir: Path) -> tuple[int, list[str]]:
    summary = _train(run_dir, {1: {SPIKE_STEP}}, nproc=2)
    return summary["rollbacks"], summary["replica_digests"]


def test_spike_rollback_ranks_agree_when_one_rank_sees_the_spike(tmp_path: Path) -> None:
    (rollbacks_0, digests_0), (rollbacks_1, digests_1) = run_distributed(_two_rank_run, tmp_path)
    assert rollbacks_0 == rollbacks_1 == 1
    assert digests_0 == digests_1 and len(set(digests_0)) == 1


def test_spike_detector_needs_a_full_window_and_ignores_non_finite() -> None:
    guard = SpikeGuard(SpikeConfig(rollback=True, window=5, threshold=3.0))
    for loss in (1.0, 1.1, 0.9, 1.0):
        guard.record(loss)
    assert not guard.is_spike(50.0)  # 4 of 5: not enough history yet
    guard.record(1.0)
    assert guard.is_spike(50.0) and not guard.is_spike(1.15)  # mean 1.0, std 0.063
    assert not guard.is_spike(float("nan")) and not guard.is_spike(float("inf"))
