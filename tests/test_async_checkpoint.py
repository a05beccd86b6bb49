"""Asynchronous FSDP2 checkpoints (checkpoint_async): training goes on while the shards are
written, the checkpoint resumes exactly like a synchronous one, and a save that never completed
(no meta.json) is never loaded; the blocked time of every save is logged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.tracking import read_metrics
from tests.spawn import RankFailed, run_distributed
from tests.test_elastic import ENGINES, MAX_STEPS, losses, run, stage_context, toy_workload

FSDP = ENGINES["fsdp"]
EVERY = 2  # checkpoint cadence: steps 2, 4 and 6 save in the background, step 8 (the last) waits


def blocked_seconds(run_dir: Path) -> dict[int, float]:
    """{step: seconds the loop was blocked by that step's save} from metrics.jsonl."""
    rows = read_metrics(run_dir / "pretrain")
    return {
        r["step"]: r["train/checkpoint_blocked_s"]
        for r in rows
        if "train/checkpoint_blocked_s" in r
    }


def test_async_checkpoint_resumes_bit_identically_to_a_synchronous_one(tmp_path: Path) -> None:
    from pipeline.train.checkpoint import list_checkpoints, verify_checkpoint

    synchronous = run(tmp_path / "sync", FSDP, 2, checkpoint_every=EVERY)
    asynchronous = run(tmp_path / "async", FSDP, 2, checkpoint_every=EVERY, checkpoint_async=True)
    assert asynchronous == synchronous  # writing in the background does not perturb training
    saved = list_checkpoints(tmp_path / "async" / "pretrain" / "checkpoints")
    assert [p.name for p in saved] == [f"step_{s:08d}" for s in range(EVERY, MAX_STEPS + 1, EVERY)]
    assert all(verify_checkpoint(p) is not None for p in saved)
    assert not list((tmp_path / "async" / "pretrain" / "checkpoints").glob(".tmp_*"))
    for name in ("sync", "async"):
        assert sorted(blocked_seconds(tmp_path / name)) == list(range(EVERY, MAX_STEPS + 1, EVERY))
    sync_s, async_s = (blocked_seconds(tmp_path / n) for n in ("sync", "async"))
    background = [s for s in range(EVERY, MAX_STEPS, EVERY)]
    print(
        "async_checkpoint blocked s per save, sync: "
        + ", ".join(f"{sync_s[s]:.3f}" for s in background)
        + "; async: "
        + ", ".join(f"{async_s[s]:.3f}" for s in background)
    )
    # An asynchronously written checkpoint resumes to the synchronous run's losses, bit for bit.
    name = "step_00000004"
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "async" / "pretrain" / "checkpoints" / name,
                    resumed_dir / "pretrain" / "checkpoints" / name)  # fmt: skip
    resumed = run(resumed_dir, FSDP, 2, checkpoint_every=EVERY)
    assert resumed == {s: synchronous[s] for s in range(5, MAX_STEPS + 1)}


def _save_then_die(run_dir: Path, stage: dict[str, Any]) -> None:
    """Train 6 steps, lose the last checkpoint, save step 6 again asynchronously and let the
    process die at once, while the shards are still being written."""
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.loop import train

    ctx = stage_context(run_dir, FSDP, 2, **stage)
    trained = train(ctx, ctx.config, toy_workload(ctx.config))  # type: ignore[arg-type]
    accelerator, last = trained.accelerator, ctx.checkpoint_dir / "step_00000006"
    meta = json.loads((last / "meta.json").read_text())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(last)
    save_checkpoint(accelerator, ctx.checkpoint_dir, 6, meta, 10, asynchronous=True)
    os._exit(0)


def test_async_checkpoint_never_loads_an_unfinished_save(tmp_path: Path) -> None:
    stage = {"checkpoint_every": EVERY, "checkpoint_async": True, "max_steps": 6}
    with pytest.raises(RankFailed, match="without a result"):
        run_distributed(_save_then_die, tmp_path, stage, world_size=2)
    first = losses(tmp_path)
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    unfinished = checkpoints / ".tmp_step_00000006"
    assert unfinished.is_dir() and not (unfinished / "meta.json").exists()
    assert not (checkpoints / "step_00000006").exists()
    # The rerun falls back to the newest complete checkpoint (step 4) and trains steps 5..6 again,
    # to the same losses.
    resumed = run(tmp_path, FSDP, 2, **stage)
    assert resumed == first and sorted(resumed) == list(range(1, 7))
    assert (checkpoints / "step_00000006" / "meta.json").is_file()
    assert not unfinished.exists()  # the rerun's own save of step 6 replaced it
