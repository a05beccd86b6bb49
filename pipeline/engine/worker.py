"""One process of a stage: `python -m pipeline.engine.worker RUN_DIR STAGE` (usually under torchrun).

Every process reads the resolved recipe from the run directory, so what runs is exactly what the
orchestrator planned, whether started locally, by torchrun or by a Slurm job. A worker exits as
soon as its launcher is gone (so an orphaned rank never writes an export) and stops at a step
boundary when the launcher asks it to (`<stage>/stop.request`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.engine import diskfull, preempt
from pipeline.engine.config import read_yaml, validate_recipe
from pipeline.engine.context import StageContext, setup_stage_logging
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.engine.kinds import stage_module
from pipeline.engine.manifest import atomic_write_json, read_manifest
from pipeline.engine.rundir import ERRORS_DIR, RECIPE_FILE, STOP_FILE


def load_context(run_dir: Path, stage: str) -> StageContext:
    recipe = validate_recipe(read_yaml(run_dir / RECIPE_FILE), source=str(run_dir / RECIPE_FILE))
    if stage not in recipe.stages:
        raise PipelineError(f"{run_dir}: recipe has no stage {stage!r}")
    manifest = read_manifest(run_dir / stage)
    return StageContext(
        run_dir=run_dir,
        name=stage,
        recipe=recipe,
        fingerprint=manifest.get("fingerprint", ""),
        wandb_id=manifest.get("wandb_id"),
    )


def execute_stage(run_dir: Path, stage: str) -> None:
    """Build the context and call the stage kind's `run(ctx)`."""
    ctx = load_context(run_dir, stage)
    setup_stage_logging(ctx.stage_dir, stage, ctx.rank)
    stage_module(ctx.kind).run(ctx)


def fallback_errors_dir(errors: Path) -> Path:
    """Where a rank reports its error when the run dir's disk is full: the temp dir (usually
    another filesystem), in a folder named after `errors`."""
    key = hashlib.sha256(str(errors.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "pipeline-errors" / key


def _redirect_output(path: Path) -> None:
    """Send this process's stdout/stderr (including C-level writes) to a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str]) -> int:
    run_dir, stage = Path(argv[0]), argv[1]
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        _redirect_output(run_dir / stage / "logs" / f"rank{rank}.out")
    preempt.install()
    preempt.watch_launcher(run_dir / stage / STOP_FILE)
    try:
        execute_stage(run_dir, stage)
    except Preempted:
        return Preempted.exit_code
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the orchestrator
        exc = diskfull.explained(exc, f"stage {stage}'s outputs", run_dir / stage)
        user_error = isinstance(exc, PipelineError)
        report = {
            "rank": rank,
            "time": time.time(),
            "user_error": user_error,
            "message": str(exc) if user_error else f"{type(exc).__name__}: {exc}",
            "traceback": "" if user_error else traceback.format_exc(),
        }
        errors = run_dir / stage / ERRORS_DIR
        try:
            atomic_write_json(errors / f"rank{rank}.json", report)
        except OSError:  # a full disk: the report goes where the launcher looks next
            with contextlib.suppress(OSError):
                atomic_write_json(fallback_errors_dir(errors) / f"rank{rank}.json", report)
        if not user_error:
            traceback.print_exc()
        return 1
    return 0


def shutdown(code: int) -> None:
    """Leave the process group cleanly, then exit without library finalizers.

    Native communication threads (DeepSpeed's shared-memory ops, gloo) can abort the interpreter
    at teardown ("terminate called without an active exception") after all work is done; the
    outputs are complete and flushed by now, so finalizers are skipped.
    """
    import logging

    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a failed teardown must not change the stage's result
        pass
    logging.shutdown()
    remove_wandb_temp_dirs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# W&B makes these temporary directories when it is imported and removes them at exit: an exit
# that skips finalizers would leave two empty directories in the temp folder per process.
WANDB_TEMP_DIRS = (
    ("wandb.sdk.data_types._private", "MEDIA_TMP"),
    ("wandb.sdk.artifacts.artifact", "Artifact._TMP_DIR"),
)


def remove_wandb_temp_dirs() -> None:
    """Remove the temporary directories W&B made in this process (if it imported W&B)."""
    for module_name, path in WANDB_TEMP_DIRS:
        found: object = sys.modules.get(module_name)
        for name in path.split(".") if found is not None else ():
            found = getattr(found, name, None)
        if isinstance(found, tempfile.TemporaryDirectory):
            found.cleanup()


if __name__ == "__main__":
    shutdown(main(sys.argv[1:]))
