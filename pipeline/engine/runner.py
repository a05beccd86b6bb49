"""The orchestrator: walk the plan, run each stage, and keep its manifest honest.

A manifest says "done" only after the stage returned, its summary was read and every file under
its export/ was checksummed. Anything else (crash, kill) leaves "running" or "failed"; a Ctrl-C
or SIGTERM leaves "interrupted" after a checkpoint at the next step boundary (see preempt). The
next `pipeline run` retries the stage, resuming from its newest checkpoint when the config is
unchanged.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.engine import preempt
from pipeline.engine.config import Recipe
from pipeline.engine.errors import PipelineError, Preempted, StageFailed
from pipeline.engine.graph import Step, plan
from pipeline.engine.launch import Rendezvous, run_in_process, run_torchrun
from pipeline.engine.manifest import atomic_write_text, checksum_tree, read_manifest, write_manifest
from pipeline.engine.rundir import (
    CHECKPOINTS_DIR,
    EXPORT_DIR,
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
)
from pipeline.engine.tracking import new_run_id


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def prepare_stage(run_dir: Path, step: Step, slurm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mark a stage running; keep its checkpoints and W&B id only when resuming the same config."""
    stage_dir = run_dir / step.name
    previous = read_manifest(stage_dir)
    resuming = previous.get("fingerprint") == step.fingerprint and previous.get("status") != "done"
    if not resuming:
        shutil.rmtree(stage_dir / CHECKPOINTS_DIR, ignore_errors=True)
        (stage_dir / METRICS_FILE).unlink(missing_ok=True)
    shutil.rmtree(stage_dir / EXPORT_DIR, ignore_errors=True)
    (stage_dir / SUMMARY_FILE).unlink(missing_ok=True)
    manifest = {
        "stage": step.name,
        "kind": step.kind,
        "fingerprint": step.fingerprint,
        "status": "running",
        "attempts": (previous.get("attempts", 0) if resuming else 0) + 1,
        "started_at": now_iso(),
        "finished_at": None,
        "duration_s": None,
        "wandb_id": previous.get("wandb_id")
        if resuming and previous.get("wandb_id")
        else new_run_id(),
        "summary": {},
        "headline": None,
        "note": None,
        "outputs": {},
        "error": None,
        "slurm": slurm if slurm is not None else previous.get("slurm", {}) if resuming else {},
    }
    write_manifest(stage_dir, manifest)
    return manifest


def finish_stage(
    run_dir: Path, name: str, manifest: dict[str, Any], started: float
) -> dict[str, Any]:
    """Collect summary and output checksums, then (and only then) mark the stage done."""
    stage_dir = run_dir / name
    summary_path = stage_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    export = stage_dir / EXPORT_DIR
    outputs = (
        {f"export/{rel}": meta for rel, meta in checksum_tree(export).items()}
        if export.is_dir()
        else {}
    )
    manifest.update(
        status="done",
        finished_at=now_iso(),
        duration_s=round(time.perf_counter() - started, 2),
        summary=summary.get("metrics", {}),
        headline=summary.get("headline"),
        note=summary.get("note"),
        outputs=outputs,
    )
    write_manifest(stage_dir, manifest)
    return manifest


def execute(
    recipe: Recipe,
    step: Step,
    rendezvous: Rendezvous | None = None,
    slurm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one stage to completion or raise StageFailed (Preempted, Interrupted); update the manifest."""
    run_dir = recipe.resolved_run_dir()
    manifest = prepare_stage(run_dir, step, slurm)
    launch = recipe.launch_for(step.name)
    started = time.perf_counter()
    try:
        if launch.nproc * launch.nnodes == 1:
            run_in_process(run_dir, step.name)
        else:
            run_torchrun(run_dir, step.name, launch, rendezvous)
    except (PipelineError, KeyboardInterrupt) as exc:
        status, reason = stopped_status(run_dir / step.name, exc)
        manifest.update(
            status=status,
            error=reason,
            finished_at=now_iso(),
            duration_s=round(time.perf_counter() - started, 2),
        )
        with contextlib.suppress(OSError):  # on a full disk it stays "running", never "done"
            write_manifest(run_dir / step.name, manifest)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if status == "interrupted":
            signum = preempt.interrupt_signal() or signal.SIGINT
            raise preempt.Interrupted(signum, f"stage {step.name}: {reason}") from None
        if isinstance(exc, Preempted):
            raise
        raise StageFailed(str(exc)) from None
    return finish_stage(run_dir, step.name, manifest, started)


def stopped_status(stage_dir: Path, exc: BaseException) -> tuple[str, str]:
    """(status, error) for the manifest of a stage that raised `exc`: interrupted (SIGINT or
    SIGTERM in `pipeline run`), preempted (a Slurm warning) or failed."""
    signum = preempt.interrupt_signal()
    if not isinstance(exc, KeyboardInterrupt) and not (
        isinstance(exc, Preempted) and signum is not None
    ):
        return ("preempted" if isinstance(exc, Preempted) else "failed"), str(exc).splitlines()[0]
    name = signal.Signals(signum or signal.SIGINT).name
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", (
            f"interrupted by {name} at once; a rerun resumes from its newest checkpoint, if any"
        )
    newest = max((p.name for p in (stage_dir / CHECKPOINTS_DIR).glob("step_*")), default=None)
    saved = f"checkpoint {newest} saved, " if newest else ""
    return "interrupted", f"interrupted by {name}; {saved}rerun the same command to resume"


def write_resolved_recipe(recipe: Recipe) -> Path:
    run_dir = recipe.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RECIPE_FILE
    atomic_write_text(path, recipe.to_yaml())
    return path


def run_recipe(
    recipe: Recipe,
    *,
    from_stage: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
    on_step: Any = None,
) -> list[tuple[Step, dict[str, Any] | None]]:
    """Execute the plan; returns each step with the manifest it ran to (None when skipped)."""
    steps = plan(recipe, from_stage=from_stage, only=only, force=force)
    write_resolved_recipe(recipe)
    results: list[tuple[Step, dict[str, Any] | None]] = []
    for step in steps:
        signum = preempt.interrupt_signal()
        if signum is not None and step.run:
            raise preempt.Interrupted(
                signum,
                f"interrupted by {signal.Signals(signum).name} before stage {step.name}; rerun the "
                f"same command to continue",
            )
        if on_step:
            on_step(step)
        results.append((step, execute(recipe, step) if step.run else None))
    return results
