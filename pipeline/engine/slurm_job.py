"""One node's share of a stage's Slurm job: `python -m pipeline.engine.slurm_job RUN_DIR STAGE` (srun).

With `--part K` it is task K of the stage's job array of parts (a fanned-out tokenize): it calls
the stage kind's `run_part(ctx, K)` and writes no manifest; the stage's own job merges the parts.

Node 0 runs the stage exactly as `pipeline run` does (the same manifest contract: done only
after the outputs are checksummed) with torchrun's rendezvous at its own address; the other nodes
start their torchrun and join it. Only node 0 writes the manifest. On a preemption warning the
workers checkpoint, and node 0 requeues the job (up to slurm.max_requeues times).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.engine import preempt
from pipeline.engine.config import Recipe, read_yaml, validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.engine.graph import Step, fingerprints
from pipeline.engine.kinds import stage_module
from pipeline.engine.launch import Rendezvous, run_torchrun
from pipeline.engine.manifest import read_manifest, update_manifest
from pipeline.engine.rundir import RECIPE_FILE
from pipeline.engine.runner import execute
from pipeline.engine.worker import shutdown

BASE_PORT = 29500


def first_node_address(nodelist: str) -> str:
    """The IP address of the job's first node, from its NodeAddr (what the other nodes reach)."""
    first = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    shown = subprocess.run(
        ["scontrol", "show", "node", "--oneliner", first], capture_output=True, text=True
    ).stdout
    found = re.search(r"NodeAddr=(\S+)", shown)
    return socket.gethostbyname(found.group(1) if found else first)


def rendezvous_port(job_id: int, restarts: int) -> int:
    """A port all nodes agree on, different for each job and for each restart of a job."""
    return BASE_PORT + (job_id + 97 * restarts) % 2000


def requeue_or_fail(recipe: Recipe, run_dir: Path, stage: str, slurm: dict[str, Any]) -> int:
    """After a preemption: requeue this job, or fail the stage once the requeue cap is reached."""
    cap = recipe.slurm_for(stage).max_requeues
    if slurm["requeues"] >= cap:
        update_manifest(
            run_dir / stage,
            status="failed",
            error=f"preempted {slurm['requeues'] + 1} times, slurm.max_requeues is {cap}; "
            f"`pipeline submit` again resumes from the checkpoint",
            slurm={**slurm, "state": "failed"},
        )
        return 1
    update_manifest(run_dir / stage, slurm={**slurm, "state": "requeued"})
    print(f"requeueing job {slurm['job_id']} ({slurm['requeues'] + 1} of {cap})", flush=True)
    subprocess.run(["scontrol", "requeue", str(slurm["job_id"])], check=True)
    return Preempted.exit_code


def run_part_task(run_dir: Path, stage: str, index: int) -> int:
    """One task of a stage's job array: encode part `index`; the exit status says how it went."""
    recipe = validate_recipe(read_yaml(run_dir / RECIPE_FILE), source=str(run_dir / RECIPE_FILE))
    ctx = StageContext(run_dir, stage, recipe, fingerprint=fingerprints(recipe)[stage])
    print(f"stage {stage}: part {index}, job {os.environ.get('SLURM_JOB_ID')}", flush=True)
    try:
        stage_module(recipe.stages[stage].kind).run_part(ctx, index)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"stage {stage}: part {index} done", flush=True)
    return 0


def main(argv: list[str]) -> int:
    run_dir, stage = Path(argv[0]).absolute(), argv[1]
    if argv[2:3] == ["--part"]:
        return run_part_task(run_dir, stage, int(argv[3]))
    preempt.install()
    recipe = validate_recipe(read_yaml(run_dir / RECIPE_FILE), source=str(run_dir / RECIPE_FILE))
    launch = recipe.launch_for(stage)
    job_id = int(os.environ["SLURM_JOB_ID"])
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    node_rank, nnodes = int(os.environ["SLURM_NODEID"]), int(os.environ["SLURM_NNODES"])
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"stage {stage}: node rank {node_rank} of {nnodes} ({node}), job {job_id}", flush=True)
    if nnodes != launch.nnodes:
        raise PipelineError(
            f"stage {stage}: job has {nnodes} nodes, the recipe's launch.nnodes is "
            f"{launch.nnodes}; submit again with `pipeline submit`"
        )
    rendezvous = None
    if launch.nproc * launch.nnodes > 1:
        host = first_node_address(os.environ["SLURM_JOB_NODELIST"])
        rendezvous = Rendezvous(host, rendezvous_port(job_id, restarts), node_rank)
        print(f"rendezvous at {host}:{rendezvous.port}", flush=True)
    if node_rank != 0:
        try:
            run_torchrun(run_dir, stage, launch, rendezvous)
        except Preempted:
            return Preempted.exit_code
        except PipelineError:
            return 1  # node 0 records the reason
        return 0
    # The nodes let `pipeline status` tell a node failure when Slurm requeues the job itself.
    nodes = os.environ["SLURM_JOB_NODELIST"]
    slurm = {"job_id": str(job_id), "state": "running", "requeues": restarts, "nodes": nodes}
    parts_job_id = (read_manifest(run_dir / stage).get("slurm") or {}).get("parts_job_id")
    if parts_job_id:  # the job array this job merges (a fanned-out tokenize)
        slurm["parts_job_id"] = parts_job_id
    step = Step(stage, recipe.stages[stage].kind, True, "slurm job", fingerprints(recipe)[stage])
    try:
        execute(recipe, step, rendezvous, slurm)
    except Preempted:
        return requeue_or_fail(recipe, run_dir, stage, slurm)
    except PipelineError as exc:
        update_manifest(run_dir / stage, slurm={**slurm, "state": "failed"})
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    update_manifest(run_dir / stage, slurm={**slurm, "state": "done"})
    return 0


if __name__ == "__main__":
    shutdown(main(sys.argv[1:]))
