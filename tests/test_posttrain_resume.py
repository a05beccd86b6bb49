"""Post-training survives kill -9: SFT and GRPO resume from their newest complete TRL checkpoint,
repeat no step, and end with the same losses, rewards and weights as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, run_until, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

TASK = {"name": "arithmetic", "max_operand": 20, "operators": ["+", "-"]}


def resume_recipe(run_dir: Path) -> dict[str, Any]:
    """tiny pretrain -> sft (12 steps) -> GRPO (8 steps), checkpoints every 4 steps, 1 process."""
    recipe = tiny_recipe(run_dir)
    recipe["stages"]["pretrain"]["max_steps"] = 12
    common = {"task": TASK, "micro_batch_size": 8, "log_every": 1, "checkpoint_every": 4,
              "keep_checkpoints": 3, "eval_problems": 20}  # fmt: skip
    recipe["stages"] |= {
        "sft": {"kind": "sft", "after": ["pretrain"], "max_steps": 12, "num_examples": 200,
                "optim": {"lr": 3e-3}, **common},
        "rlhf": {"kind": "rlhf", "after": ["sft"], "algorithm": "grpo", "max_steps": 8,
                 "num_examples": 64, "num_generations": 4, "max_completion_length": 4,
                 "rewards": ["exact", "partial"], "optim": {"lr": 1e-3}, **common},
    }  # fmt: skip
    del recipe["stages"]["eval"]
    return recipe


def last_logged(stage_dir: Path) -> dict[int, dict[str, float]]:
    """The `train/*` values of each step as last logged (a resumed attempt overwrites)."""
    rows: dict[int, dict[str, float]] = {}
    for row in read_metrics(stage_dir):
        train = {k: v for k, v in row.items() if k.startswith("train/") and "time" not in k}
        if train:
            rows[row["step"]] = train
    return rows


def weights(export: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(export / "model.safetensors")


@pytest.mark.slow
def test_fault_sft_and_grpo_resume_after_kill(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    result = cli("run", str(write_recipe(tmp_path / "ref.yaml", resume_recipe(reference))))
    assert result.returncode == 0, result.stderr[-3000:]
    path = write_recipe(tmp_path / "killed.yaml", resume_recipe(killed))
    run_until(path, killed, "sft/checkpoints/checkpoint-8/trainer_state.json")
    run_until(path, killed, "rlhf/checkpoints/checkpoint-4/trainer_state.json")
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, resumed_at in (("sft", 8), ("rlhf", 4)):
        log = (killed / stage / "stage.log").read_text()
        assert f"resuming from checkpoint-{resumed_at}" in log
        # No step is trained twice: the last attempt's first logged step follows the checkpoint.
        steps = [r["step"] for r in read_metrics(killed / stage) if "train/loss" in r]
        restarts = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
        assert restarts in ([], [resumed_at + 1]) and steps[-1] == len(
            last_logged(reference / stage)
        )
        expected, got = last_logged(reference / stage), last_logged(killed / stage)
        assert list(got) == list(expected)
        for step, values in expected.items():
            for key in ("train/loss", "train/grad_norm", "train/reward"):
                assert got[step].get(key) == values.get(key), (stage, step, key)
        ref_weights, new_weights = (
            weights(reference / stage / "export"),
            weights(killed / stage / "export"),
        )
        assert all((ref_weights[k] == new_weights[k]).all() for k in ref_weights)
        summary = json.loads((killed / stage / "stage.json").read_text())["summary"]
        ref_summary = json.loads((reference / stage / "stage.json").read_text())["summary"]
        assert summary["task_accuracy"] == ref_summary["task_accuracy"]
