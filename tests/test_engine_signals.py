"""Signals to `pipeline run` (pipeline/engine/preempt.py, launch.py): ranks die with their launcher;
SIGINT/SIGTERM checkpoint at a step boundary, mark the stage interrupted, and the rerun resumes."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.manifest import read_manifest
from pipeline.engine.rundir import LOCK_FILE
from tests.helpers import (
    cli,
    is_running,
    live_descendants,
    start_run,
    tiny_recipe,
    wait_for,
    write_recipe,
)

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

# A dead launcher's ranks must be gone within this many seconds (measured: well under one).
RANKS_GONE_WITHIN_S = 5.0


def _pretrain(tmp_path: Path, prepared: Path, *, nproc: int, max_steps: int) -> tuple[Path, Path]:
    """tokenizer -> tokenize (done) -> pretrain logging every step, checkpointing when stopped."""
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(prepared, run_dir)
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update(
        launch={"nproc": nproc},
        max_steps=max_steps,
        log_every=1,
        eval_every=max_steps,
        checkpoint_every=max_steps,
    )
    return write_recipe(tmp_path / "tiny.yaml", data), run_dir / "pretrain"


def _checkpoints(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in (stage_dir / "checkpoints").glob("step_*"))


def _ranks(launcher_pid: int) -> list[Any]:
    """The launcher's descendants: the torchrun agent and (checked) its two ranks."""
    procs = live_descendants(launcher_pid)
    workers = [p for p in procs if "pipeline.engine.launch" not in p.cmdline()]
    assert len(workers) == 2, [p.cmdline() for p in procs]
    return procs


def test_kill_9_of_the_launcher_takes_every_rank_down_before_any_export(
    tmp_path: Path, prepared: Path
) -> None:
    recipe, stage_dir = _pretrain(tmp_path, prepared, nproc=2, max_steps=3000)
    proc = start_run(recipe)
    try:
        wait_for(stage_dir / "metrics.jsonl", proc)  # both ranks are training
        second = cli("run", str(recipe))  # the live launcher holds the run dir
        assert second.returncode == 2 and f"pid {proc.pid} on" in second.stderr, second.stderr
        procs = _ranks(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        killed = time.monotonic()
        while any(is_running(p) for p in procs):
            assert time.monotonic() - killed < RANKS_GONE_WITHIN_S, [
                p.cmdline() for p in procs if is_running(p)
            ]
            time.sleep(0.01)
        gone_after_s = time.monotonic() - killed
    finally:
        proc.kill()
        proc.communicate()
    print(f"launcher killed: agent and ranks gone after {gone_after_s:.2f}s")
    time.sleep(2.0)  # anything an orphaned rank would write would show up by now
    assert not (stage_dir / "export").exists()
    assert not (stage_dir / "summary.json").exists()
    assert read_manifest(stage_dir)["status"] == "running"  # the launcher died: nobody updated it
    assert (stage_dir.parent / LOCK_FILE).read_text().strip()  # its record stays, the flock not


def test_sigint_checkpoints_marks_interrupted_and_the_rerun_resumes(
    tmp_path: Path, prepared: Path
) -> None:
    recipe, stage_dir = _pretrain(tmp_path, prepared, nproc=1, max_steps=12)
    proc = start_run(recipe)
    wait_for(stage_dir / "metrics.jsonl", proc)  # training (in the launcher's own process)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "interrupted" and "SIGINT" in manifest["error"], manifest
    (saved,) = _checkpoints(stage_dir)  # written at the step boundary after the signal
    assert saved in manifest["error"] and saved in stderr.splitlines()[-1]
    stopped_at = int(saved.removeprefix("step_"))
    assert 0 < stopped_at < 12 and not (stage_dir / "export").exists()

    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    resumed = [
        line for line in (stage_dir / "stage.log").read_text().splitlines() if "resuming" in line
    ]
    assert len(resumed) == 1 and f"{saved} (step {stopped_at}," in resumed[0], resumed
    assert (stage_dir / "export" / "model.safetensors").is_file()


def test_sigterm_stops_two_ranks_at_a_step_boundary_with_exit_143(
    tmp_path: Path, prepared: Path
) -> None:
    recipe, stage_dir = _pretrain(tmp_path, prepared, nproc=2, max_steps=3000)
    proc = start_run(recipe)
    wait_for(stage_dir / "metrics.jsonl", proc)
    procs = _ranks(proc.pid)
    proc.send_signal(signal.SIGTERM)  # the launcher alone: it asks the ranks to stop
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert not any(is_running(p) for p in procs)
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"], manifest
    (saved,) = _checkpoints(stage_dir)
    assert (stage_dir / "checkpoints" / saved / "random_states_1.pkl").is_file()  # both ranks
    assert f"error: stage pretrain: interrupted by SIGTERM; checkpoint {saved}" in stderr


def test_a_second_sigint_stops_at_once(tmp_path: Path, prepared: Path) -> None:
    recipe, stage_dir = _pretrain(tmp_path, prepared, nproc=1, max_steps=3000)
    proc = start_run(recipe)
    wait_for(stage_dir / "stage.json", proc)  # the stage started: seconds before its first step
    proc.send_signal(signal.SIGINT)
    # Two signals before the handler runs would count as one (the main thread may sit in one
    # long C call, such as loading a library), so the second goes only once the first one's
    # handler has answered; a fixed pause let the first step boundary come first on a fast host.
    first = [proc.stderr.readline()]
    while first[-1] and "stopping at the next step boundary" not in first[-1]:
        first.append(proc.stderr.readline())
    assert first[-1], "".join(first)  # the first one asked politely (and did not stop the run)
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(first) + stderr
    assert time.monotonic() - second < 5.0
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "interrupted" and "at once" in manifest["error"], manifest
    assert _checkpoints(stage_dir) == []
    assert (stage_dir.parent / LOCK_FILE).read_text() == ""  # released on the way out
