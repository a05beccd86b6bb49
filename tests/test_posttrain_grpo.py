"""GRPO learns: from an SFT model that half-solves a task, a short GRPO run with verifiable rewards
raises the mean reward and held-out greedy accuracy (fixed seed, one process, ~1.5 min). From the
same SFT model: the guard against reward hacking (one process and two), online DPO's rounds, and
a round killed with kill -9 that resumes to the uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from pipeline.engine.faults import ENV
from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from pipeline.stages.preferences import PAIRS_FILE
from tests.helpers import REWARD_STEPS_ENV, cli, start_run, wait_for, write_recipe

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


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir whose stages up to sft are done: the policy every test here starts from."""
    root = tmp_path_factory.mktemp("grpo")
    recipe = grpo_recipe(root / "run")
    del recipe["stages"]["rlhf"]
    result = cli("run", str(write_recipe(root / "sft.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def with_stages(run_dir: Path, stages: dict[str, Any]) -> dict[str, Any]:
    """grpo_recipe up to sft (done in `run_dir`, so skipped) plus `stages`."""
    recipe = grpo_recipe(run_dir)
    del recipe["stages"]["rlhf"]
    recipe["stages"] |= stages
    return recipe


@pytest.mark.slow
def test_grpo_raises_reward_and_held_out_accuracy(sft_run: Path, tmp_path: Path) -> None:
    run_dir = sft_run
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


GUARD = {"every": 5, "problems": 64, "patience": 2, "kl_prompts": 16}


@pytest.mark.slow
def test_guard_stops_a_hacked_run_and_exports_the_best_policy(
    sft_run: Path, tmp_path: Path
) -> None:
    """A poisoned reward (wrong answers pay) makes gold fall: the guard stops the run and the
    export is the policy of the best measurement, gold for gold."""
    poisoned = {"kind": "rlhf", "after": ["sft"], "task": TASK,
                "rewards": ["tests.helpers:wrong_answer_reward"], "num_examples": 500,
                "max_steps": 40, "micro_batch_size": 64, "num_generations": 8,
                "max_completion_length": 7, "temperature": 1.0, "optim": {"lr": 2e-3},
                "guard": GUARD, "eval_problems": 0, "log_every": 5}  # fmt: skip
    summary, rows = run_guarded(sft_run, tmp_path, "poisoned", poisoned)
    gold = {r["step"]: r["guard/gold"] for r in rows if "guard/gold" in r}
    kl = [r["guard/kl"] for r in rows if "guard/kl" in r]
    assert gold[0] >= 0.25 and kl[0] == 0.0 and kl[-1] > 0.1  # it moved, away from gold
    assert export_gold(sft_run / "poisoned", 500, GUARD["problems"]) == summary["guard_best_gold"]


def run_guarded(
    sft_run: Path, tmp_path: Path, name: str, stage: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run guarded `stage` after sft; check that its guard stopped it (40 steps asked) on a fall
    of gold; its summary metrics and metrics.jsonl rows."""
    recipe = with_stages(sft_run, {name: stage})
    result = cli("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sft_run / name / "summary.json").read_text())["metrics"]
    assert summary["guard_last_step"] < 40 and "stopped at step" in summary["guard_reason"]
    assert summary["guard_last_gold"] < summary["guard_best_gold"]
    return summary, read_metrics(sft_run / name)


def export_gold(stage_dir: Path, num_examples: int, problems: int) -> float:
    """The gold accuracy of a guarded stage's export, on the guard's own problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.tasks import TaskConfig
    from pipeline.stages.rl_gold import gold_accuracy, gold_problems

    task = TypeAdapter(TaskConfig).validate_python(TASK)
    export = stage_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    return gold_accuracy(model, AutoTokenizer.from_pretrained(export), task,
                         gold_problems(task, num_examples, problems, 0))  # fmt: skip


def test_sft_guard_stops_when_held_apart_accuracy_falls_and_exports_the_best_checkpoint(
    sft_run: Path, tmp_path: Path
) -> None:
    """SFT's early stopping: a learning rate that wrecks the half-trained model makes gold fall,
    so the guard stops the stage and exports the best measured weights (here the start's)."""
    guard = {"every": 5, "problems": 64, "patience": 2}
    wreck = {"kind": "sft", "after": ["sft"], "task": TASK, "num_examples": 640, "max_steps": 40,
             "micro_batch_size": 16, "optim": {"lr": 0.05}, "guard": guard, "eval_problems": 0,
             "log_every": 5}  # fmt: skip
    summary, rows = run_guarded(sft_run, tmp_path, "wreck", wreck)
    gold = {r["step"]: r["guard/gold"] for r in rows if "guard/gold" in r}
    assert gold[0] >= 0.25 and list(gold)[:2] == [0, 5]
    scored = export_gold(sft_run / "wreck", 640, guard["problems"])
    assert scored == summary["guard_best_gold"] == max(gold.values())


@pytest.mark.slow
def test_online_dpo_round_samples_the_current_policy_reproducibly(
    sft_run: Path, tmp_path: Path
) -> None:
    """preferences -> dpo -> preferences of the dpo policy: pairs name their policy and judge,
    the same seed gives the same pairs, and round 2 samples the DPO model."""
    prefs = {"kind": "preferences", "task": TASK, "num_prompts": 48, "samples": 4}
    stages = {
        "prefs1": {**prefs, "after": ["sft"]},
        "dpo1": {"kind": "rlhf", "after": ["sft", "prefs1"], "model": "sft", "algorithm": "dpo",
                 "pairs": "prefs1", "task": TASK, "max_steps": 4, "micro_batch_size": 8,
                 "optim": {"lr": 1e-4}, "eval_problems": 0},
        "prefs2": {**prefs, "after": ["dpo1"], "round": 2},
    }  # fmt: skip
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", with_stages(sft_run, stages))))
    assert result.returncode == 0, result.stderr[-3000:]
    first = (sft_run / "prefs1" / "export" / "pairs.jsonl").read_text()
    pairs = [json.loads(line) for line in first.splitlines()]
    assert (
        pairs and {p["model"] for p in pairs} == {"sft"} and {p["judge"] for p in pairs} == {"task"}
    )
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    second = [json.loads(line) for line in (sft_run / "prefs2" / "export" / "pairs.jsonl").open()]
    assert {p["model"] for p in second} == {"dpo1"}
    assert not {p["prompt"] for p in pairs} & {p["prompt"] for p in second}  # fresh prompts
    recipe_path = write_recipe(tmp_path / "r.yaml", with_stages(sft_run, stages))
    again = cli("run", str(recipe_path), "--only", "prefs1", "--force")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sft_run / "prefs1" / "export" / "pairs.jsonl").read_text() == first


# Files that name the run, not the model: git's dirty flag, TRL's absolute checkpoint path.
NOT_THE_MODEL = ("provenance.json", "training_args.bin")


def copy_up_to_sft(sft_run: Path, run_dir: Path) -> Path:
    """A copy of `sft_run`'s stages up to sft (done, so a run there skips them)."""
    for stage in ("tokenizer", "tokenize", "pretrain", "sft"):
        shutil.copytree(sft_run / stage, run_dir / stage)
    return run_dir


def export_bytes(export: Path) -> dict[str, bytes]:
    """Every file of an export but those that name the run, and its bytes."""
    return {
        str(p.relative_to(export)): p.read_bytes()
        for p in sorted(export.rglob("*"))
        if p.is_file() and p.name not in NOT_THE_MODEL
    }


@pytest.mark.slow
def test_online_dpo_round_killed_with_kill_9_resumes_to_the_uninterrupted_round(
    sft_run: Path, tmp_path: Path
) -> None:
    """One round (preferences -> dpo) killed by SIGKILL three times: in preferences while it
    samples, then (pipeline/engine/faults.py) once its pairs are written but before it is marked
    done, then in dpo between backward and update. No kill leaves it done; each rerun ends with
    the uninterrupted round's pairs and the same DPO export, byte for byte."""
    stages = {
        "prefs": {"kind": "preferences", "after": ["sft"], "task": TASK, "num_prompts": 48,
                  "samples": 4},
        "dpo": {"kind": "rlhf", "after": ["sft", "prefs"], "model": "sft", "algorithm": "dpo",
                "pairs": "prefs", "task": TASK, "max_steps": 4, "micro_batch_size": 8,
                "optim": {"lr": 1e-4}, "checkpoint_every": 2, "eval_problems": 0},
    }  # fmt: skip
    reference, killed = (copy_up_to_sft(sft_run, tmp_path / name) for name in ("ref", "killed"))
    result = cli("run", str(write_recipe(tmp_path / "ref.yaml", with_stages(reference, stages))))
    assert result.returncode == 0, result.stderr[-3000:]
    path = write_recipe(tmp_path / "killed.yaml", with_stages(killed, stages))
    pairs, left = (run / "prefs" / "export" / PAIRS_FILE for run in (reference, killed))

    def left_running(stage: str) -> None:
        manifest = read_manifest(killed / stage)
        assert manifest["status"] == "running" and manifest["outputs"] == {}

    run = start_run(path)  # the stage makes its export folder, then loads the policy and samples
    wait_for(killed / "prefs" / "export", run)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate()
    left_running("prefs")
    for fault in ("prefs:manifest_write:2", "dpo:mid_step:3"):  # 2nd manifest write: "done"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(ENV, fault)
            died = cli("run", str(path))
        assert died.returncode == -9, (died.returncode, died.stderr[-3000:])
        left_running(fault.split(":")[0])
        assert left.read_bytes() == pairs.read_bytes()  # complete, yet not taken as done
        if fault.startswith("prefs"):  # as if torn: the rerun must sample again, not reuse it
            left.write_bytes(left.read_bytes()[: left.stat().st_size // 2])
    assert not (killed / "dpo" / "export").exists()
    rerun = cli("run", str(path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_manifest(killed / "dpo")["status"] == "done"
    assert "resuming from checkpoint-2" in (killed / "dpo" / "stage.log").read_text()
    expected = export_bytes(reference / "dpo" / "export")
    got = export_bytes(killed / "dpo" / "export")
    assert "model.safetensors" in expected and expected.keys() == got.keys()
    assert [name for name in expected if expected[name] != got[name]] == []
    assert left.read_bytes() == pairs.read_bytes()


@pytest.mark.slow
def test_guard_under_ddp_stops_every_rank_at_once_and_exports_the_best_policy(
    sft_run: Path, tmp_path: Path
) -> None:
    """The poisoned run of the guard test on 2 gloo processes (half the batch each): both ranks
    train the same steps and stop together when gold falls, and the export holds the weights
    the guard kept at its best measurement, not the last policy's."""
    from safetensors.torch import load_file

    poisoned = {"kind": "rlhf", "after": ["sft"], "task": TASK,
                "rewards": ["tests.helpers:wrong_answer_reward_by_rank"], "num_examples": 500,
                "max_steps": 40, "micro_batch_size": 32, "num_generations": 8,
                "max_completion_length": 7, "temperature": 1.0, "optim": {"lr": 2e-3},
                "guard": GUARD, "eval_problems": 0, "log_every": 5,
                "launch": {"nproc": 2}}  # fmt: skip
    run_dir = copy_up_to_sft(sft_run, tmp_path / "run")
    path = write_recipe(tmp_path / "recipe.yaml", with_stages(run_dir, {"poisoned": poisoned}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(REWARD_STEPS_ENV, str(tmp_path))
        result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    stage = run_dir / "poisoned"
    summary = json.loads((stage / "summary.json").read_text())["metrics"]
    stopped, best = summary["guard_last_step"], summary["guard_best_step"]
    assert stopped < 40 and f"stopped at step {stopped}" in summary["guard_reason"]
    assert best < stopped and summary["guard_last_gold"] < summary["guard_best_gold"]
    # Each rank scored its half of every step's samples, up to the same last step.
    trained = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert trained[0] == trained[1] == [str(step) for step in range(stopped)]
    kept = load_file(str(stage / "guard" / f"best-{best}.safetensors"))
    exported = load_file(str(stage / "export" / "model.safetensors"))
    assert kept.keys() <= exported.keys() and all(exported[k].equal(v) for k, v in kept.items())
