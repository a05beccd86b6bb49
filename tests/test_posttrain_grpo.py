"""GRPO learns: from an SFT model that half-solves a task, a short GRPO run with verifiable rewards
raises the mean reward and held-out greedy accuracy (fixed seed, one process, ~1.5 min)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

TASK = {"name": "sort", "min_length": 4, "max_length": 4}


def grpo_recipe(run_dir: Path) -> dict[str, Any]:
    """A tiny llama: 20 pretrain steps on stdlib, SFT to about half the held-out problems, GRPO."""
    return {
        "name": "grpo-learns",
        "run_dir": str(run_dir),
        "seed": 0,
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "vocab_size": 400, "sample_bytes": 400_000,
                          "split_digits": True,
                          "source": [{"uri": "builtin:python-stdlib", "max_bytes": 300_000},
                                     {"uri": "builtin:task", "task": TASK, "problems": 2000}]},
            "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "num_workers": 1,
                         "source": {"uri": "builtin:python-stdlib", "max_bytes": 300_000}},
            "pretrain": {"kind": "pretrain", "after": ["tokenize"], "seq_len": 32,
                         "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
                         "micro_batch_size": 8, "max_steps": 20, "schedule": {"warmup_steps": 2},
                         "log_every": 10, "eval_every": 20, "checkpoint_every": 20},
            "sft": {"kind": "sft", "after": ["pretrain"], "task": TASK, "num_examples": 3000,
                    "max_steps": 100, "micro_batch_size": 32, "optim": {"lr": 3e-3},
                    "schedule": {"warmup_steps": 10}, "eval_problems": 0, "log_every": 50},
            "rlhf": {"kind": "rlhf", "after": ["sft"], "task": TASK, "rewards": ["exact", "partial"],
                     "num_examples": 2000, "max_steps": 80, "micro_batch_size": 128,
                     "num_generations": 8, "max_completion_length": 7, "temperature": 0.5,
                     "scale_rewards": "none", "optim": {"lr": 5e-4},
                     "schedule": {"warmup_steps": 5}, "eval_every": 80,
                     "eval_every_problems": 300, "eval_problems": 0, "log_every": 5,
                     "checkpoint_every": 1000},
        },
    }  # fmt: skip


@pytest.mark.slow
def test_grpo_raises_reward_and_held_out_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli("run", str(write_recipe(tmp_path / "recipe.yaml", grpo_recipe(run_dir))))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir / "rlhf")
    accuracy = {r["step"]: r["eval/task_accuracy"] for r in rows if "eval/task_accuracy" in r}
    rewards = [r["train/reward"] for r in rows if "train/reward" in r]
    assert list(accuracy) == [0, 80] and len(rewards) == 16
    # The SFT model half-solves the task; GRPO must move it, not just keep it.
    assert 0.25 <= accuracy[0] <= 0.75
    assert accuracy[80] >= accuracy[0] + 0.04
    assert sum(rewards[-3:]) / 3 >= sum(rewards[:3]) / 3 + 0.1
