"""`pipeline submit` against a real private Slurm cluster: dependencies, multi-node, failure,
preemption and requeue; plus the sbatch rendering, which needs no cluster."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, tiny_recipe, write_recipe
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - pytest fixture

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

STAGES = ["tokenizer", "tokenize", "pretrain", "eval"]


@pytest.fixture(autouse=True)
def wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def _submit(recipe: Path, *args: str) -> str:
    result = cli("submit", str(recipe), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _queue() -> str:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _wait_until_idle(timeout_s: float = 480) -> None:
    deadline = time.time() + timeout_s
    while _queue() and time.time() < deadline:
        time.sleep(1)
    assert not _queue(), f"jobs still queued after {timeout_s}s: {_queue()}"


def _job(run_dir: Path, stage: str) -> dict[str, Any]:
    return read_manifest(run_dir / stage).get("slurm", {})


def _job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True
    ).stdout
    return next((kv.split("=", 1)[1] for kv in shown.split() if kv.startswith(f"{field}=")), "")


def test_dry_run_renders_sbatch_files_without_slurm(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path / "runs" / "tiny")
    data["slurm"] = {"partition": "gpu", "gpus_per_node": 8, "extra": ["--constraint=a100"]}
    data["stages"]["pretrain"]["launch"] = {"nnodes": 4, "nproc": 8}
    data["stages"]["pretrain"]["slurm"] = {"time": "12:00:00", "qos": "high"}
    recipe = write_recipe(tmp_path / "tiny.yaml", data)
    out = _submit(recipe, "--dry-run")
    assert "would submit" in out and out.count("dry run") == 4
    run_dir = tmp_path / "runs" / "tiny"
    script = (run_dir / "pretrain" / "slurm" / "job.sbatch").read_text()
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --qos=high",
        "#SBATCH --time=12:00:00",
        "#SBATCH --constraint=a100",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        f"RUN_DIR={run_dir}",
        "STAGE=pretrain",
    ):
        assert line in script.splitlines(), line
    tokenizer = (run_dir / "tokenizer" / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in tokenizer and "#SBATCH --time=04:00:00" in tokenizer
    assert "yaml" not in script.replace("recipe.yaml", "")
    assert (run_dir / "recipe.yaml").is_file()
    assert read_manifest(run_dir / "pretrain") == {}


@pytest.mark.slow
def test_submit_runs_in_order_multi_node_and_resubmits_nothing(
    tmp_path: Path,
    slurm_cluster: Path,  # noqa: F811
) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    data = tiny_recipe(run_dir)
    data["stages"]["pretrain"]["launch"] = {"nnodes": 2, "nproc": 1}
    recipe = write_recipe(tmp_path / "tiny.yaml", data)
    _submit(recipe)
    _wait_until_idle()
    manifests = {s: read_manifest(run_dir / s) for s in STAGES}
    for stage, manifest in manifests.items():
        assert manifest["status"] == "done", (stage, manifest)
        assert manifest["slurm"]["state"] == "done" and manifest["slurm"]["job_id"]
    for before, after in zip(STAGES, STAGES[1:], strict=False):
        assert manifests[before]["finished_at"] <= manifests[after]["started_at"]
    assert len(manifests["pretrain"]["summary"]["replica_digests"]) == 2
    assert "on 2 ranks" in (run_dir / "pretrain" / "stage.log").read_text()
    job = manifests["pretrain"]["slurm"]["job_id"]
    for node in (0, 1):
        log = (run_dir / "pretrain" / "slurm" / f"slurm-{job}-node{node}.out").read_text()
        assert f"node rank {node} of 2" in log

    status = cli("status", str(run_dir))
    assert status.returncode == 0
    for stage in STAGES:
        assert f"{manifests[stage]['slurm']['job_id']} COMPLETED" in status.stdout, status.stdout
    assert "stale" not in status.stdout

    again = _submit(recipe)
    assert "nothing to submit" in again and not _queue()


@pytest.mark.slow
def test_failed_stage_blocks_dependents(tmp_path: Path, slurm_cluster: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "runs" / "tiny"
    data = tiny_recipe(run_dir)
    data["stages"]["pretrain"]["seq_len"] = 1_000_000
    _submit(write_recipe(tmp_path / "tiny.yaml", data))
    _wait_until_idle()
    pretrain = read_manifest(run_dir / "pretrain")
    assert pretrain["status"] == "failed" and "seq_len" in pretrain["error"]
    assert read_manifest(run_dir / "tokenize")["status"] == "done"
    assert "status" not in read_manifest(run_dir / "eval")
    eval_job = _job(run_dir, "eval")["job_id"]
    assert _job_field(eval_job, "JobState") == "CANCELLED"
    status = cli("status", str(run_dir)).stdout
    assert f"failed: {pretrain['error'][:40]}" in status
    assert f"{_job(run_dir, 'pretrain')['job_id']} FAILED" in status
    assert f"{eval_job} CANCELLED (DependencyNeverSatisfied)" in status


@pytest.mark.slow
def test_preempted_pretrain_requeues_and_matches_uninterrupted(
    tmp_path: Path,
    slurm_cluster: Path,  # noqa: F811
) -> None:
    def recipe_for(name: str) -> Path:
        data = tiny_recipe(tmp_path / "runs" / name)
        del data["stages"]["eval"]
        data["name"] = name
        # Long enough (seconds, not milliseconds) that USR1 always lands mid-training.
        data["stages"]["pretrain"].update(
            model={"hidden_size": 64, "num_layers": 2, "num_heads": 2},
            seq_len=64,
            micro_batch_size=8,
            max_steps=300,
            log_every=1,
            eval_every=1000,
            checkpoint_every=1000,
        )
        return write_recipe(tmp_path / f"{name}.yaml", data)

    reference = cli("run", str(recipe_for("reference")))
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "runs" / "preempted"
    _submit(recipe_for("preempted"))
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.5)
    job = _job(run_dir, "pretrain")["job_id"]
    wandb_id = read_manifest(run_dir / "pretrain")["wandb_id"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.time() + 120
    while time.time() < deadline and _job_field(job, "Restarts") != "1":
        time.sleep(0.5)
    assert _job_field(job, "Restarts") == "1", _queue()
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "preempted" and manifest["slurm"]["state"] == "requeued"
    saved = json.loads(next((run_dir / "pretrain" / "checkpoints").glob("*/meta.json")).read_text())
    assert 3 <= saved["step"] < 300
    assert "requeued 1x" in cli("status", str(run_dir)).stdout
    # Slurm holds a requeued job back for about two minutes; start it now to keep the test short.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _wait_until_idle()

    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert manifest["wandb_id"] == wandb_id and manifest["slurm"]["requeues"] == 1
    assert (
        f"resuming from step_{saved['step']:08d}"
        in (run_dir / "pretrain" / "stage.log").read_text()
    )
    ours = load_file(run_dir / "pretrain" / "export" / "model.safetensors")
    theirs = load_file(
        tmp_path / "runs" / "reference" / "pretrain" / "export" / "model.safetensors"
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_submit_tokenize_parts_as_slurm_job_array_equals_local_run(
    tmp_path: Path,
    slurm_cluster: Path,  # noqa: F811
) -> None:
    from tests.test_tokenize_fanout import big_txt, export_files

    run_dir = tmp_path / "runs" / "tiny"
    source = {"uri": str(big_txt(tmp_path / "input.txt", count=3000))}
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    for stage in ("tokenizer", "tokenize"):
        data["stages"][stage]["source"] = source
    data["stages"]["tokenizer"]["vocab_size"] = 300
    data["stages"]["tokenize"].update(shard_tokens=2999, val_fraction=0.1)
    recipe = write_recipe(tmp_path / "tiny.yaml", data)
    local = cli("run", str(recipe))
    assert local.returncode == 0, local.stdout + local.stderr
    export = run_dir / "tokenize" / "export"
    expected = export_files(export)
    assert sum(name.endswith(".bin") for name in expected) > 4

    out = _submit(recipe, "-o", "stages.tokenize.parts=2")
    _wait_until_idle()
    manifests = {s: read_manifest(run_dir / s) for s in ("tokenize", "pretrain")}
    for stage, manifest in manifests.items():
        assert manifest["status"] == "done", (stage, manifest, out)
    job = manifests["tokenize"]["slurm"]
    array = job["parts_job_id"]
    for part in (0, 1):
        log = (run_dir / "tokenize" / "slurm" / f"slurm-{array}_{part}.out").read_text()
        assert f"part {part} done" in log, log
        assert _job_field(f"{array}_{part}", "JobState") in ("COMPLETED", "")
    # the merge job found both parts done by the array (it encodes none itself)
    assert "encoding parts" not in (run_dir / "tokenize" / "stage.log").read_text()
    assert manifests["tokenize"]["finished_at"] <= manifests["pretrain"]["started_at"]
    assert manifests["tokenize"]["summary"]["parts"] == 2
    got = export_files(export)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name


def test_a_controller_that_does_not_answer_is_not_taken_for_a_job_that_ended(
    tmp_path: Path,
    slurm_cluster: Path,  # noqa: F811
) -> None:
    """A stage recorded as queued, and Slurm's controller cannot be reached: `submit` and `run`
    refuse in one line instead of queueing (or running) the stage a second time beside a job that
    may still run it; `status` shows the recorded state and says Slurm did not answer. A job id
    the (reachable) controller never knew is not refused: that is a job that is gone."""
    import re

    from pipeline.engine.manifest import update_manifest

    run_dir = tmp_path / "runs" / "tiny"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(run_dir))
    update_manifest(run_dir / "pretrain", slurm={"job_id": "987654", "state": "submitted"})
    unreachable = tmp_path / "unreachable.conf"  # the live cluster's file, a port nobody serves
    unreachable.write_text(
        re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=1", slurm_cluster.read_text())
    )
    away = {"SLURM_CONF": str(unreachable)}
    for command in (["submit", str(recipe)], ["run", str(recipe), "--only", "tokenizer"]):
        refused = cli(*command, extra_env=away)
        assert refused.returncode != 0, refused.stdout
        assert "Traceback" not in refused.stderr
        message = refused.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert "job 987654" in message and "did not say whether it is still queued" in message
        assert message.endswith(
            f'delete the "slurm" entry of {run_dir / "pretrain" / "stage.json"}'
        )
    assert read_manifest(run_dir / "tokenizer").get("status") != "done"  # nothing ran
    shown = cli("status", str(recipe), extra_env=away)
    assert shown.returncode == 0, shown.stderr
    assert "987654 submitted (Slurm not answering)" in shown.stdout
    gone = cli("run", str(recipe), "--only", "tokenizer")  # the live cluster: an unknown id
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert read_manifest(run_dir / "tokenizer")["status"] == "done"
