"""The TRL stages stop for preemption like our loop (pipeline/train/runtime.py
preemption_callback): a stop asked on any rank saves a checkpoint at the next step boundary and
ends the stage as preempted; the rerun resumes from that checkpoint and finishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.engine import preempt
from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import Preempted
from pipeline.engine.manifest import read_manifest
from pipeline.engine.runner import run_recipe
from pipeline.engine.tracking import read_metrics
from tests.helpers import tiny_recipe

TASK = {"name": "arithmetic", "max_operand": 20, "operators": ["+", "-"]}


def test_sft_preempted_saves_at_the_next_step_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = tiny_recipe(tmp_path)
    del data["stages"]["eval"]
    data["stages"]["sft"] = {"kind": "sft", "after": ["pretrain"], "task": TASK, "max_steps": 6,
                             "num_examples": 64, "micro_batch_size": 8, "log_every": 1,
                             "checkpoint_every": 100, "eval_problems": 8}  # fmt: skip
    recipe = validate_recipe(data)
    run_recipe(recipe, only=["tokenizer", "tokenize", "pretrain"])
    monkeypatch.setattr(preempt, "_received", True)  # as Slurm's warning signal would set it
    with pytest.raises(Preempted, match=r"stages\.sft: preempted after step 1; checkpoint saved"):
        run_recipe(recipe)
    stage_dir = tmp_path / "sft"
    assert read_manifest(stage_dir)["status"] != "done"
    assert (stage_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (stage_dir / "export").exists()
    monkeypatch.setattr(preempt, "_received", False)
    with caplog.at_level("INFO"):
        run_recipe(recipe)
    assert "resuming from checkpoint-1" in (stage_dir / "stage.log").read_text()
    assert read_manifest(stage_dir)["status"] == "done"
    steps = [r["step"] for r in read_metrics(stage_dir) if "train/loss" in r]
    assert steps[-1] == 6 and 2 in steps  # training went on after the checkpoint
