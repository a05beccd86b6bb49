"""The shared training loop (pipeline/train/loop.py) in process, on a toy workload: the
non-finite guard skips a poisoned step on every rank and stops after max_bad_steps in a row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.tracking import read_metrics
from tests.spawn import run_distributed


def _context(run_dir: Path, nproc: int = 1, **loop: object) -> StageContext:
    stage = {"kind": "pretrain", "max_steps": 6, "micro_batch_size": 4, "log_every": 1,
             "eval_every": 100, "checkpoint_every": 1, "keep_checkpoints": 10,
             "schedule": {"warmup_steps": 0}, **loop}  # fmt: skip
    recipe = validate_recipe({"name": "loop", "run_dir": str(run_dir), "launch": {"nproc": nproc},
                              "tracking": {"mode": "disabled"}, "stages": {"pretrain": stage}})  # fmt: skip
    return StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint="toy")


def _train(run_dir: Path, poisoned: dict[int, set[int]], nproc: int = 1, **loop: object) -> dict:
    """A linear regression through the loop; batches of `poisoned[rank]` steps are NaN."""
    import torch

    from pipeline.train.loop import Workload, train

    ctx = _context(run_dir, nproc, **loop)
    torch.manual_seed(0)

    def batch(step: int, micro: int, rank: int, world: int) -> np.ndarray:
        rows = np.random.default_rng([step, micro, rank]).normal(size=(4, 5)).astype(np.float32)
        return rows * np.nan if step in poisoned.get(rank, set()) else rows

    def loss(model: torch.nn.Module, rows: torch.Tensor, generator: object) -> tuple:
        return ((model(rows[:, :4]) - rows[:, 4:]) ** 2).mean(), {}

    val = [np.ones((4, 5), dtype=np.float32)]
    work = Workload(torch.nn.Linear(4, 1), loss, batch, lambda rank, world: val, "rows", [])
    return train(ctx, ctx.config, work).summary  # type: ignore[arg-type]


def _weights(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(
        run_dir / "pretrain" / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
    )


def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    import torch

    summary = _train(tmp_path, poisoned={0: {2}})  # step index 2 = optimizer step 3
    assert summary["skipped_steps"] == 1
    before, skipped, after = (_weights(tmp_path, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update at step 3
    assert not all(torch.equal(skipped[k], after[k]) for k in before)  # training went on
    assert all(torch.isfinite(v).all() for v in after.values())
    rows = read_metrics(tmp_path / "pretrain")
    assert [r["step"] for r in rows if "train/skipped_step" in r] == [3]
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["val_loss"])


def test_nonfinite_max_bad_steps_in_a_row_stop_with_one_line_naming_the_checkpoint(
    tmp_path: Path,
) -> None:
    with pytest.raises(PipelineError) as info:
        _train(tmp_path, poisoned={0: {2, 3, 4}}, max_bad_steps=3, checkpoint_every=2)
    message = str(info.value)
    assert "\n" not in message
    assert "3 optimizer step(s) in a row up to step 5" in message
    assert "last good checkpoint: step_00000004" in message
    # Nothing computed is lost: the checkpoints written before the stop are intact.
    assert (tmp_path / "pretrain" / "checkpoints" / "step_00000004" / "meta.json").is_file()


def test_nonfinite_guard_off_trains_through_and_ends_non_finite(tmp_path: Path) -> None:
    summary = _train(tmp_path, poisoned={0: {2}}, max_bad_steps=0)
    assert summary["skipped_steps"] == 0 and not np.isfinite(summary["train_loss"])


def _two_rank_run(run_dir: Path) -> tuple[int, list[str]]:
    summary = _train(run_dir, poisoned={1: {1}}, nproc=2)
    return summary["skipped_steps"], summary["replica_digests"]


def test_nonfinite_ranks_agree_to_skip_a_step_only_one_rank_saw_go_bad(tmp_path: Path) -> None:
    (skipped_0, digests_0), (skipped_1, digests_1) = run_distributed(_two_rank_run, tmp_path)
    assert skipped_0 == skipped_1 == 1
    assert digests_0 == digests_1 and len(set(digests_0)) == 1  # replicas still identical


def test_resume_reproduces_the_saved_probe_loss_and_the_uninterrupted_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import shutil

    import torch

    _train(tmp_path, poisoned={}, checkpoint_every=2)
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    final = _weights(tmp_path, 6)
    shutil.rmtree(checkpoints / "step_00000006")  # as if killed after step 4's checkpoint
    summary = _train(tmp_path, poisoned={}, checkpoint_every=2)
    assert summary["resume_loss_diff"] == 0.0  # bit for bit on the same code and engine
    assert all(torch.equal(final[k], v) for k, v in _weights(tmp_path, 6).items())
    # A checkpoint that does not give back the state it was saved with is reported.
    shutil.rmtree(checkpoints / "step_00000006")
    meta_path = checkpoints / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "probe_loss": meta["probe_loss"] + 0.5}))
    with caplog.at_level("WARNING", logger="pipeline.pretrain"):
        summary = _train(tmp_path, poisoned={}, checkpoint_every=2)
    assert summary["resume_loss_diff"] == pytest.approx(0.5)
    assert "does not continue the interrupted one exactly" in caplog.text
