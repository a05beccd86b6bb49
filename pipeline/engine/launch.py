"""Start a stage: in this process (one process) or under torchrun (several), and report failures.

`python -m pipeline.engine.launch TORCHRUN_ARGS...` is torchrun with its launcher noise silenced: when
a rank fails, the engine shows that rank's own error (from `<stage>/errors/`), not the elastic
agent's wall of tracebacks. The agent runs in a session of its own (a Ctrl-C in the terminal reaches
the launcher only, which asks the ranks to stop at a step boundary) and dies with its launcher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine import diskfull, preempt
from pipeline.engine.config import LaunchConfig
from pipeline.engine.errors import PipelineError, Preempted, StageFailed
from pipeline.engine.rundir import (
    CHECKPOINTS_DIR,
    ERRORS_DIR,
    LOG_FILE,
    PARTIAL_CHECKPOINT_PREFIX,
    STOP_FILE,
)
from pipeline.engine.worker import execute_stage, fallback_errors_dir


def run_in_process(run_dir: Path, stage: str) -> None:
    """Run a one-process stage here; errors are recorded like a worker's and re-raised."""
    try:
        execute_stage(run_dir, stage)
    except PipelineError:
        raise
    except Exception as exc:
        explained = diskfull.explained(exc, f"stage {stage}'s outputs", run_dir / stage)
        if explained is not exc:  # a full disk: one line, no traceback to write
            raise explained from None
        log_path = run_dir / stage / LOG_FILE
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        raise StageFailed(
            f"stage {stage} crashed: {type(exc).__name__}: {exc} (traceback in {log_path})"
        ) from exc


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node launch meet (node 0's address and a port) and our rank."""

    host: str
    port: int
    node_rank: int


def torchrun_command(
    run_dir: Path, stage: str, launch: LaunchConfig, rendezvous: Rendezvous | None = None
) -> list[str]:
    """The command line that starts `launch.nproc` workers on this node (one of `launch.nnodes`)."""
    where = (
        ["--standalone"]
        if rendezvous is None
        else [
            f"--node-rank={rendezvous.node_rank}",
            f"--master-addr={rendezvous.host}",
            f"--master-port={rendezvous.port}",
        ]
    )
    return [
        sys.executable,
        "-m",
        "pipeline.engine.launch",
        *where,
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc}",
        "--module",
        "pipeline.engine.worker",
        str(run_dir),
        stage,
    ]


def worker_env(launch: LaunchConfig) -> dict[str, str]:
    """The environment of the agent and its ranks: threads per rank, progress style, our pid."""
    env = dict(os.environ)
    env[preempt.LAUNCHER_PID_ENV] = str(os.getpid())
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // launch.nproc)))
    if sys.stderr.isatty():
        env.setdefault("PIPELINE_PROGRESS", "bar")
    return env


def run_torchrun(
    run_dir: Path, stage: str, launch: LaunchConfig, rendezvous: Rendezvous | None = None
) -> None:
    """Run a stage under torchrun; on failure raise with the root-cause rank's error."""
    errors = run_dir / stage / ERRORS_DIR
    for old in [*errors.glob("rank*.json"), *fallback_errors_dir(errors).glob("rank*.json")]:
        old.unlink()
    stop_file = run_dir / stage / STOP_FILE
    stop_file.unlink(missing_ok=True)
    command = torchrun_command(run_dir, stage, launch, rendezvous)
    proc = subprocess.Popen(command, env=worker_env(launch), start_new_session=True)
    try:
        with preempt.delegated(stop=stop_file.touch, kill=lambda: _kill_session(proc)):
            returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted while waiting: the ranks follow their agent
            _kill_session(proc)
            proc.wait()
        stop_file.unlink(missing_ok=True)
    if returncode == Preempted.exit_code:
        raise Preempted(f"stage {stage}: preempted; checkpoint saved, a rerun resumes from it")
    if returncode != 0:
        remove_partial_checkpoints(run_dir / stage)
        raise StageFailed(first_rank_error(errors, stage, returncode))


def remove_partial_checkpoints(stage_dir: Path) -> None:
    """Remove the checkpoint saves a failed stage left unfinished, now that its ranks have exited.

    A rank that fails mid-save removes its own temporary directory, but another rank may still
    be writing into it (`save_state` makes the directory again) and stops later: only here, with
    every rank gone, is nothing left to write. A save in progress is never loaded either way.
    """
    for partial in (stage_dir / CHECKPOINTS_DIR).glob(f"{PARTIAL_CHECKPOINT_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent's session; its ranks die with it (parent-death signal)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def first_rank_error(errors: Path, stage: str, returncode: int) -> str:
    """The error of the rank that failed first (others usually fail because it did)."""
    reports = []
    fallback = fallback_errors_dir(errors)  # reports that did not fit on a full disk
    for path in [*errors.glob("rank*.json"), *fallback.glob("rank*.json")]:
        try:
            reports.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    shutil.rmtree(fallback, ignore_errors=True)
    if not reports and diskfull.nearly_full(errors):
        return diskfull.message(f"stage {stage}'s outputs", errors.parent)
    if not reports:
        return (
            f"stage {stage}: workers exited with code {returncode} without an error report "
            f"(killed? out of memory?); see {errors.parent / 'stage.log'} and {errors.parent / 'logs'}"
        )
    first = min(reports, key=lambda r: r["time"])
    if first.get("user_error"):
        return first["message"]
    return (
        f"stage {stage} crashed on rank {first['rank']}: {first['message']}\n"
        f"{first.get('traceback', '').rstrip()}"
    )


def quiet_torchrun(argv: list[str]) -> int:
    """torchrun's main with the elastic agent's logging and ChildFailedError dump suppressed.

    The agent ignores the preemption signal (Slurm sends it to every process of the step; the
    workers act on it), exits with the workers' preemption code when they all stopped for it, and
    dies with its launcher.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in (
        "torch.distributed.elastic",
        "torch.distributed.run",
        "torch.distributed.launcher",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    signal.signal(preempt.SIGNAL, signal.SIG_IGN)
    preempt.watch_launcher()
    args = get_args_parser().parse_args(argv)
    # The agent's per-rank log folders: torchrun makes a temporary one and leaves it behind.
    with tempfile.TemporaryDirectory(prefix="torchelastic_") as log_dir:
        args.log_dir = args.log_dir or log_dir
        try:
            run(args)
        except ChildFailedError as exc:
            codes = {failure.exitcode for failure in exc.failures.values()}
            return Preempted.exit_code if codes == {Preempted.exit_code} else 1
    return 0


if __name__ == "__main__":
    sys.exit(quiet_torchrun(sys.argv[1:]))
