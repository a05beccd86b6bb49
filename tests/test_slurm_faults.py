"""A Slurm node dies under a running pretrain job, or the job is cancelled with scancel:
`pipeline status` says what happened (never done), and the stage then resumes from its newest
checkpoint, ending with the same export, bit for bit, as an uninterrupted local `pipeline run`.

Each job is frozen (SIGSTOP) once it has written a checkpoint, so the fault always lands
mid-training however fast the machine is; Slurm itself sees a running job."""

from __future__ import annotations

import getpass
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, is_running, tiny_recipe, write_recipe
from tests.slurm_cluster import kill_node, revive_node, slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # each submits and resumes a real Slurm job

REASON = "killed by the fault test"
COLUMNS = ("stage", "kind", "status", "fresh", "duration", "tries", "queue", "metric")


@pytest.fixture(autouse=True)
def wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture(autouse=True)
def no_job_left(slurm_cluster: Path) -> Iterator[None]:  # noqa: F811
    """A test that fails leaves no job (frozen, requeued or queued) behind for the next one."""
    yield
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False)


def _recipe(run_dir: Path) -> dict[str, Any]:
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update(
        max_steps=30, checkpoint_every=3, keep_checkpoints=5, eval_every=1000
    )
    return data


def _weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run_dir / "pretrain" / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> dict[str, Any]:
    """The export of an uninterrupted local run of the recipe."""
    base = tmp_path_factory.mktemp("reference")
    shutil.copytree(prepared, base / "run")
    result = cli("run", str(write_recipe(base / "reference.yaml", _recipe(base / "run"))))
    assert result.returncode == 0, result.stderr[-2000:]
    return _weights(base / "run")


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"no {what} within {timeout_s}s: {_queue()}"
        time.sleep(0.2)


def _queue() -> str:
    """squeue's jobs, one line each. A failed squeue (a busy controller times out) is asked again,
    never read as an empty queue: that ended a wait for the job while it still ran."""
    for _ in range(100):
        shown = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout.strip()
        time.sleep(0.5)
    raise AssertionError(f"squeue kept failing: {shown.stderr.strip()}")


def _job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True
    ).stdout
    return next((kv.split("=", 1)[1] for kv in shown.split() if kv.startswith(f"{field}=")), "")


def _checkpoints(run_dir: Path) -> list[int]:
    found = (run_dir / "pretrain" / "checkpoints").glob("step_*/meta.json")
    return sorted(int(meta.parent.name.removeprefix("step_")) for meta in found)


def _processes_of(run_dir: Path) -> list[Any]:
    """Live processes whose command line names `run_dir` (srun and the stage's ranks do)."""
    import psutil

    return [
        p for p in psutil.process_iter(["cmdline"])
        if str(run_dir) in " ".join(p.info["cmdline"] or []) and is_running(p)
    ]  # fmt: skip


def _status(run_dir: Path) -> dict[str, str]:
    """The pretrain row of `pipeline status RUN_DIR`, by column."""
    result = cli("status", str(run_dir))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ pretrain "))
    return dict(zip(COLUMNS, (cell.strip() for cell in row.strip("│").split("│")), strict=True))


def _submit_and_freeze(tmp_path: Path, prepared: Path, requeue: bool = True) -> tuple[Any, ...]:
    """Submit the recipe (pretrain is its only job) and freeze the job's stage process once a
    checkpoint exists. Returns (run dir, recipe, job id, its node, newest checkpoint step)."""
    run_dir = tmp_path / "runs" / "faulty"
    shutil.copytree(prepared, run_dir)
    recipe = write_recipe(tmp_path / "faulty.yaml", _recipe(run_dir))
    submitted = cli("submit", str(recipe))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = read_manifest(run_dir / "pretrain")["slurm"]["job_id"]
    if not requeue:  # as on a cluster that does not requeue jobs after a node failure
        subprocess.run(["scontrol", "update", f"JobId={job}", "Requeue=0"], check=True)
    _wait(lambda: _checkpoints(run_dir), "pretrain checkpoint")
    stage = [p for p in _processes_of(run_dir) if p.info["cmdline"][0] == sys.executable]
    assert stage, "no stage process to freeze"  # (srun names the run dir too)
    for proc in stage:
        proc.send_signal(signal.SIGSTOP)
    assert not (run_dir / "pretrain" / "export").exists(), "pretrain finished before the fault"
    assert _job_field(job, "JobState") == "RUNNING"
    nodes = read_manifest(run_dir / "pretrain")["slurm"]["nodes"]
    return run_dir, recipe, job, nodes, _checkpoints(run_dir)[-1]


def _assert_not_done(run_dir: Path, status: dict[str, str], shown: str = "running") -> None:
    """Not done anywhere; `shown` is the status column (a job that ended: stopped)."""
    assert status["status"] == shown and "COMPLETED" not in status["queue"], status
    assert read_manifest(run_dir / "pretrain")["status"] == "running"
    assert not (run_dir / "pretrain" / "export").exists()
    assert _processes_of(run_dir) == []


def _resubmit(run_dir: Path, recipe: Path, old_job: str) -> None:
    """`pipeline submit` again: not refused, and only the unfinished pretrain is a new job."""
    result = cli("submit", str(recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    new_job = read_manifest(run_dir / "pretrain")["slurm"]["job_id"]
    assert new_job != old_job
    assert [line.split()[0] for line in _queue().splitlines()] == [new_job], _queue()


def _assert_resumed(run_dir: Path, saved_step: int, reference: dict[str, Any]) -> None:
    """Resumed from `saved_step` or later in a second attempt, and ended with the reference's
    export. Later: scancel continues a frozen job (SIGCONT) before its SIGTERM, and the stage
    may save a newer checkpoint on its way out; which one depends on timing."""
    import re

    import torch

    _wait(lambda: not _queue(), "empty queue")
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "done" and manifest["attempts"] == 2, manifest
    log = (run_dir / "pretrain" / "stage.log").read_text()
    resumed = re.search(r"resuming from step_(\d+)", log)
    assert resumed and int(resumed.group(1)) >= saved_step, log[-2000:]
    ours = _weights(run_dir)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name


def test_fault_slurm_node_killed_slurm_requeues_and_job_resumes(
    tmp_path: Path,
    prepared: Path,
    reference: dict[str, Any],
    slurm_cluster: Path,  # noqa: F811
) -> None:
    run_dir, recipe, job, node, saved = _submit_and_freeze(tmp_path, prepared)
    try:
        kill_node(slurm_cluster, node, REASON)
        requeued = lambda: (_job_field(job, "JobState"), _job_field(job, "Restarts"))  # noqa: E731
        _wait(lambda: requeued() == ("PENDING", "1"), "requeue after the node failure")
        status = _status(run_dir)
        assert status["queue"].startswith(f"{job} PENDING (requeued 1x"), status
        assert f"node failed, {node} down" in status["queue"] and REASON in status["queue"]
        _assert_not_done(run_dir, status)
        # Slurm requeued the job itself (sbatch --requeue): a second job would be a duplicate.
        refused = cli("submit", str(recipe))
        assert refused.returncode == 1 and f"already queued as job {job}" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
    finally:
        revive_node(slurm_cluster, node)
    # Slurm holds a requeued job back for about two minutes; start it now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _assert_resumed(run_dir, saved, reference)
    assert read_manifest(run_dir / "pretrain")["slurm"]["requeues"] == 1
    assert _status(run_dir)["queue"] == f"{job} COMPLETED"


def test_fault_slurm_node_killed_without_requeue_then_resubmit_resumes(
    tmp_path: Path,
    prepared: Path,
    reference: dict[str, Any],
    slurm_cluster: Path,  # noqa: F811
) -> None:
    run_dir, recipe, job, node, saved = _submit_and_freeze(tmp_path, prepared, requeue=False)
    try:
        kill_node(slurm_cluster, node, REASON)
        _wait(lambda: _job_field(job, "JobState") == "NODE_FAIL", "NODE_FAIL state")
        status = _status(run_dir)
        assert status["queue"].startswith(f"{job} NODE_FAIL (NodeDown): node failed, {node} down")
        assert status["queue"].endswith(f"({REASON}); `pipeline submit` resumes it"), status
        _assert_not_done(run_dir, status, "stopped (job ended)")
    finally:
        revive_node(slurm_cluster, node)
    _resubmit(run_dir, recipe, job)
    _assert_resumed(run_dir, saved, reference)


def test_fault_slurm_scancel_then_resubmit_resumes(
    tmp_path: Path,
    prepared: Path,
    reference: dict[str, Any],
    slurm_cluster: Path,  # noqa: F811
) -> None:
    run_dir, recipe, job, _, saved = _submit_and_freeze(tmp_path, prepared)
    subprocess.run(["scancel", job], check=True)
    _wait(lambda: _job_field(job, "JobState") == "CANCELLED", "CANCELLED state")
    _wait(lambda: not _processes_of(run_dir), "end of the job's processes", timeout_s=60)
    status = _status(run_dir)
    expected = f"{job} CANCELLED: cancelled; `pipeline submit` resumes it"
    assert status["queue"] == expected, status
    _assert_not_done(run_dir, status, "stopped (job ended)")
    _resubmit(run_dir, recipe, job)
    _assert_resumed(run_dir, saved, reference)
