"""`pipeline submit`: one sbatch job per stage that is not up to date, chained with afterok.

Each job file is rendered from `slurm/stage.sbatch` and carries only the run directory and the
stage name; the job (`pipeline.engine.slurm_job`) reads everything else from the resolved recipe. Jobs
are submitted held, recorded in their stage manifests, then released, so a job never races the
record of its own submission.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from pipeline.engine.config import Recipe, SlurmConfig
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.graph import plan
from pipeline.engine.manifest import atomic_write_text, read_manifest, update_manifest
from pipeline.engine.rundir import MANIFEST_FILE, SLURM_DIR
from pipeline.engine.runner import now_iso, write_resolved_recipe

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "stage.sbatch"
PARTS_TEMPLATE = TEMPLATE.with_name("stage_parts.sbatch")
# States of a job that is still in the queue (held, pending, running or on its way out).
ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT",
    "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING", "STAGE_OUT",
}  # fmt: skip
# End states other than COMPLETED, as `pipeline status` names them.
ENDED_STATES = {
    "CANCELLED": "cancelled",
    "NODE_FAIL": "node failed",
    "BOOT_FAIL": "node failed to boot",
    "TIMEOUT": "time limit reached",
    "OUT_OF_MEMORY": "out of memory",
    "DEADLINE": "deadline passed",
    "PREEMPTED": "preempted",
    "FAILED": "failed",
}


class SbatchTemplate(Template):
    """`@{name}` placeholders, so the shell's own `$VAR`s need no escaping."""

    delimiter = "@"


@dataclass(frozen=True)
class Submission:
    """One stage of a submit: its job id (None on --dry-run or when skipped) and dependencies."""

    stage: str
    kind: str
    reason: str
    script: Path | None = None
    job_id: str | None = None
    after: tuple[str, ...] = ()
    parts_job_id: str | None = None


def sbatch_options(slurm: SlurmConfig) -> list[str]:
    """`#SBATCH` lines for the recipe's (or the stage's) slurm settings."""
    values = {
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "gpus-per-node": slurm.gpus_per_node or None,
        "cpus-per-task": slurm.cpus_per_task,
        "mem": slurm.mem,
        "time": slurm.time,
    }
    lines = [f"#SBATCH --{key}={value}" for key, value in values.items() if value is not None]
    for extra in slurm.extra:  # one option on one line each: checked by SbatchOption
        option = extra.strip()
        lines.append(option if option.startswith("#SBATCH") else f"#SBATCH {option}")
    return lines


def render(recipe: Recipe, stage: str, parts: int = 0) -> str:
    """The sbatch file of one stage, or (parts > 1) of its job array of parts."""
    run_dir = recipe.resolved_run_dir()
    if re.search(r"[\s\"'\\]", str(run_dir)):  # sbatch splits `#SBATCH --output=` at blanks
        raise RecipeError(
            f"run_dir {str(run_dir)!r}: sbatch cannot take a path with blanks or quotes; choose "
            f"a run_dir without them for `pipeline submit`"
        )
    slurm = recipe.slurm_for(stage)
    template = PARTS_TEMPLATE if parts > 1 else TEMPLATE
    return SbatchTemplate(template.read_text()).substitute(
        last_part=parts - 1,
        stage=shlex.quote(stage),
        job_name=f"{recipe.name}.{stage}",
        nodes=recipe.launch_for(stage).nnodes,
        log_dir=run_dir / stage / SLURM_DIR,
        signal_seconds=slurm.signal_seconds,
        options="\n".join(sbatch_options(slurm)),
        run_dir=shlex.quote(str(run_dir)),
        python=shlex.quote(sys.executable),
    )


class SlurmToolMissing(PipelineError):
    """A Slurm client command is not on PATH (a run directory read away from its cluster)."""


class SlurmCommandFailed(PipelineError):
    """A Slurm client command exited non-zero; `detail` is the last line it wrote."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class SlurmUnanswered(PipelineError):
    """The controller could not be asked about a job (down, or too busy to answer in time)."""


# scontrol's words for a job the controller no longer (or never) knew.
UNKNOWN_JOB = "Invalid job id"


def slurm_command(*args: str) -> str:
    """Run a Slurm client command and return its stdout; a missing tool is a user error."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SlurmToolMissing(
            f"{args[0]}: not found; `pipeline submit` needs Slurm's client tools on PATH "
            f"(for the test cluster: slurm/testcluster.sh start DIR; export SLURM_CONF=...)"
        ) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SlurmCommandFailed(
            f"{' '.join(args[:2])}: failed ({detail}); "
            f"check the cluster with sinfo and the recipe's slurm section",
            detail,
        )
    return proc.stdout


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about a job: its state, its reason, how often it was requeued, its nodes."""

    state: str
    reason: str = ""
    restarts: int = 0
    nodes: str = ""


def job_state(job_id: str) -> JobInfo | None:
    """A job's state from scontrol, else (a job the controller has forgotten) sacct; None when
    Slurm does not know the job or its tools are not here. A controller that does not answer
    raises SlurmUnanswered: a busy controller is not a job that ended, and reading it as one
    would let `pipeline submit` queue a stage that is still running."""
    try:
        shown = slurm_command("scontrol", "show", "job", "--oneliner", job_id)
    except SlurmToolMissing:
        return None
    except SlurmCommandFailed as error:
        if UNKNOWN_JOB not in error.detail:
            raise SlurmUnanswered(
                f"job {job_id}: Slurm did not say whether it is still queued ({error.detail}); "
                f"try again when the controller answers (scontrol ping)"
            ) from None
    else:
        fields = dict(re.findall(r"(\w+)=(\S*)", shown))
        reason = fields.get("Reason", "None")
        return JobInfo(
            fields.get("JobState", "UNKNOWN"),
            "" if reason == "None" else reason,
            int(fields.get("Restarts", "0")),
            "" if fields.get("NodeList") in (None, "(null)") else fields["NodeList"],
        )
    try:
        rows = slurm_command("sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id).split()
    except PipelineError:  # no accounting storage: the job is gone from the controller too
        return None
    return JobInfo(rows[0].split()[0]) if rows else None


def down_nodes(nodes: str) -> str:
    """Which of `nodes` (a Slurm node list) are down, drained, failing or not responding, with
    the reason Slurm gives; "" when all are well or sinfo cannot tell."""
    if not nodes:
        return ""
    try:
        rows = slurm_command("sinfo", "-h", "-N", "-n", nodes, "-o", "%N|%T|%E").splitlines()
    except PipelineError:
        return ""
    found: dict[str, str] = {}
    for name, state, reason in (row.split("|", 2) for row in rows if row.count("|") == 2):
        if "*" in state or any(word in state for word in ("down", "drain", "fail")):
            found[name] = f"{name} {state}" + (f" ({reason})" if reason != "none" else "")
    return ", ".join(found.values())


def what_happened(manifest: dict, job: JobInfo) -> str:
    """The queue cell's explanation of a job that ended (or was requeued by Slurm) after its
    stage started and before it was done: what the end state means, which node went down."""
    slurm, status = manifest.get("slurm") or {}, manifest.get("status")
    if status in (None, "done"):  # never started (Slurm's reason says why), or finished
        return ""
    if job.state in ENDED_STATES:
        if job.state == "FAILED" and status == "failed":
            return ""  # the status column carries the stage's own error
        failed_node = job.state in ("NODE_FAIL", "BOOT_FAIL")
        lost = down_nodes(job.nodes or slurm.get("nodes", "")) if failed_node else ""
        meaning = ENDED_STATES[job.state] + (f", {lost}" if lost else "")
        return f"{meaning}; `pipeline submit` resumes it"
    # Requeued by Slurm, not by the job itself (which records "requeued" first): its run was lost.
    if job.restarts > int(slurm.get("requeues", 0)) and slurm.get("state") == "running":
        lost = down_nodes(slurm.get("nodes", ""))
        return f"node failed, {lost}" if lost else "previous run lost"
    return ""


def queue_column(manifest: dict) -> str:
    """`pipeline status`'s queue cell: job id and live state (with what went wrong, when the job
    ended before its stage was done), or the last recorded state."""
    slurm = manifest.get("slurm") or {}
    job_id = slurm.get("job_id")
    if not job_id:
        return "-"
    try:
        job = job_state(str(job_id))
    except SlurmUnanswered:
        return f"{job_id} {slurm.get('state', '?')} (Slurm not answering)"
    if job is None:
        return f"{job_id} {slurm.get('state', '?')}"
    notes = [job.reason] if job.reason else []
    if job.restarts and job.state in ACTIVE_STATES:
        notes.insert(0, f"requeued {job.restarts}x")
    cell = f"{job_id} {job.state}" + (f" ({', '.join(notes)})" if notes else "")
    what = what_happened(manifest, job)
    return f"{cell}: {what}" if what else cell


def refuse_active_jobs(recipe: Recipe, stages: list[str], command: str) -> None:
    """Raise when a job recorded in one of these stages' manifests is still queued or running:
    it writes into the run directory (`pipeline run` and `submit` call this under the lock)."""
    run_dir = recipe.resolved_run_dir()
    for stage in stages:
        job_id = (read_manifest(run_dir / stage).get("slurm") or {}).get("job_id")
        try:
            live = job_state(str(job_id)) if job_id else None
        except SlurmUnanswered as error:
            raise SlurmUnanswered(
                f"stage {stage}: {error}; if that cluster is gone for good, delete the "
                f'"slurm" entry of {run_dir / stage / MANIFEST_FILE}'
            ) from None
        if live and live.state in ACTIVE_STATES:
            raise PipelineError(
                f"stage {stage}: already queued as job {job_id} ({live.state}); "
                f"wait for it or `scancel {job_id}`, then {command} again"
            )


def submit(
    recipe: Recipe,
    *,
    from_stage: str | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
) -> list[Submission]:
    """Submit every stage that is not up to date as a job that waits for its upstream jobs."""
    steps = plan(recipe, from_stage=from_stage, only=only)
    run_dir = recipe.resolved_run_dir()
    refuse_active_jobs(recipe, [step.name for step in steps if step.run], "submit")
    write_resolved_recipe(recipe)
    submissions: list[Submission] = []
    job_ids: dict[str, str] = {}
    try:
        for step in steps:
            if not step.run:
                submissions.append(Submission(step.name, step.kind, step.reason))
                continue
            script = run_dir / step.name / SLURM_DIR / "job.sbatch"
            atomic_write_text(script, render(recipe, step.name))
            after = tuple(dep for dep in recipe.stages[step.name].after if dep in job_ids)
            upstream = [job_ids[dep] for dep in after]
            parts_id = submit_parts(recipe, step.name, upstream, dry_run)
            if parts_id:
                job_ids[f"{step.name}.parts"] = parts_id
            waits = [*upstream, parts_id] if parts_id else upstream
            job_id = None if dry_run else sbatch_held(script, waits)
            if job_id:
                record = {"job_id": job_id, "state": "submitted", "submitted_at": now_iso()}
                if parts_id:
                    record["parts_job_id"] = parts_id
                update_manifest(run_dir / step.name, slurm=record)
            job_ids[step.name] = job_id or f"<{step.name}>"
            submissions.append(
                Submission(step.name, step.kind, step.reason, script, job_id, after, parts_id)
            )
    except PipelineError:
        if job_ids and not dry_run:  # do not leave half a pipeline held in the queue
            subprocess.run(["scancel", *job_ids.values()], check=False)
        raise
    held = [j for s in submissions for j in (s.parts_job_id, s.job_id) if j and j[0] != "<"]
    if held:
        slurm_command("scontrol", "release", ",".join(held))
    return submissions


def submit_parts(recipe: Recipe, stage: str, upstream: list[str], dry_run: bool) -> str | None:
    """For a stage with `parts` > 1 (a fanned-out tokenize): submit its job array of parts, held,
    after `upstream`; the stage's own job then merges. Returns the array's job id."""
    parts = getattr(recipe.stages[stage], "parts", 1)
    if parts <= 1:
        return None
    script = recipe.resolved_run_dir() / stage / SLURM_DIR / "parts.sbatch"
    atomic_write_text(script, render(recipe, stage, parts))
    return f"<{stage}.parts>" if dry_run else sbatch_held(script, upstream)


def sbatch_held(script: Path, upstream_jobs: list[str]) -> str:
    """Submit a job file on hold, after its upstream jobs succeed; returns the job id."""
    args = ["sbatch", "--parsable", "--hold"]
    if upstream_jobs:
        args.append(f"--dependency=afterok:{':'.join(upstream_jobs)}")
    return slurm_command(*args, str(script)).strip().split(";")[0]
