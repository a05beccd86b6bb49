"""The orchestrator in this process (pipeline/engine: graph, runner, manifest): which stages run
and why, what a manifest records, and when a rerun resumes; on digits -> report in seconds.

tests/test_engine_runner.py covers the same rules end to end through the `pipeline` CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import Recipe, validate_recipe
from pipeline.engine.errors import StageFailed
from pipeline.engine.graph import plan
from pipeline.engine.manifest import checksum_tree, read_manifest, verify_outputs
from pipeline.engine.runner import prepare_stage, run_recipe


def digits_recipe(run_dir: Path, **images: Any) -> Recipe:
    source = {"uri": "builtin:digits", "max_images": 200}
    return validate_recipe(
        {
            "name": "digits",
            "run_dir": str(run_dir),
            "tracking": {"mode": "disabled"},
            "stages": {
                "images": {"kind": "images", "source": source, **images},
                "report": {"kind": "report", "after": ["images"]},
            },
        }
    )


def decisions(recipe: Recipe, **flags: Any) -> dict[str, tuple[bool, str]]:
    """{stage: (runs?, reason shown to the user)} of the plan."""
    return {step.name: (step.run, step.reason) for step in plan(recipe, **flags)}


def test_a_finished_run_is_up_to_date_until_an_output_or_the_config_changes(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    recipe = digits_recipe(run_dir)
    ran = [(step.name, step.reason) for step, _ in run_recipe(recipe)]
    assert ran == [("images", "never run"), ("report", "upstream reruns")]
    manifest = read_manifest(run_dir / "images")
    assert manifest["status"] == "done" and manifest["attempts"] == 1
    export = run_dir / "images" / "export"
    assert manifest["outputs"] == {f"export/{k}": v for k, v in checksum_tree(export).items()}
    assert "export/train_images.npy" in manifest["outputs"]
    assert decisions(recipe) == {"images": (False, "up to date"), "report": (False, "up to date")}
    assert decisions(recipe, only=["report"]) == {
        "images": (False, "not selected (up to date)"),
        "report": (True, "selected with --only"),
    }
    assert decisions(recipe, from_stage="images") == {
        "images": (True, "--from images"),
        "report": (True, "--from images"),
    }

    # Touched (new mtime) but the same bytes: checksummed again, still up to date.
    labels = export / "val_labels.npy"
    written = labels.stat().st_mtime_ns
    os.utime(labels, ns=(written + 10**9, written + 10**9))
    assert decisions(recipe)["images"] == (False, "up to date")
    # Same size, other bytes, written in place: every plan sees the new mtime and checksums.
    data = bytearray(labels.read_bytes())
    data[-1] ^= 0xFF
    labels.write_bytes(bytes(data))
    assert decisions(recipe) == {
        "images": (True, "output export/val_labels.npy fails its checksum"),
        "report": (True, "upstream reruns"),
    }
    # Only a deep check (`status --verify`) sees a change whose mtime was put back by hand.
    os.utime(labels, ns=(written, written))
    assert verify_outputs(run_dir / "images", manifest["outputs"]) is None
    problem = verify_outputs(run_dir / "images", manifest["outputs"], deep=True)
    assert problem == "output export/val_labels.npy fails its checksum"
    # A changed size is seen by every plan, and the stages downstream rerun with it.
    labels.write_bytes(bytes(data) + b"\0")
    assert decisions(recipe) == {
        "images": (True, "output export/val_labels.npy changed size"),
        "report": (True, "upstream reruns"),
    }
    assert decisions(digits_recipe(run_dir, val_fraction=0.2))["images"] == (
        True,
        "config or upstream changed",
    )


def test_a_failed_stage_is_recorded_and_only_the_same_config_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = str(tmp_path / "nowhere")
    recipe = digits_recipe(run_dir, source=missing)
    with pytest.raises(StageFailed, match="no such image folder"):
        run_recipe(recipe)
    failed = read_manifest(run_dir / "images")
    assert failed["status"] == "failed" and "no such image folder" in failed["error"]
    assert read_manifest(run_dir / "report") == {}  # never started: its upstream failed
    assert decisions(recipe)["images"] == (True, "last attempt failed (will resume)")

    checkpoint = run_dir / "images" / "checkpoints" / "step_1" / "state.bin"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"state")
    resumed = prepare_stage(run_dir, plan(recipe)[0])
    assert resumed["status"] == "running" and resumed["attempts"] == 2
    assert resumed["wandb_id"] == failed["wandb_id"] and checkpoint.is_file()

    changed = plan(digits_recipe(run_dir, source=missing, val_fraction=0.2))[0]
    fresh = prepare_stage(run_dir, changed)
    assert fresh["attempts"] == 1 and fresh["wandb_id"] != failed["wandb_id"]
    assert not checkpoint.exists()  # another config's checkpoints would resume the wrong run
