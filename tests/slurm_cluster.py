"""A private two-node Slurm cluster for the tests (slurm/testcluster.sh), or a skip saying why not;
and a way to let one of its nodes die and come back."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "slurm" / "testcluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start munge, slurmctld and two slurmd daemons; yield slurm.conf; stop them at the end."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(t)]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
        )
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        [str(SCRIPT), "start", str(directory)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **cluster_apart()},
    )  # fmt: skip
    try:
        if started.returncode != 0:
            pytest.skip(f"the test cluster did not start: {started.stderr.strip()[-300:]}")
        conf = directory / "slurm.conf"
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)
        yield conf
        if previous is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = previous
    finally:
        subprocess.run([str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)


def cluster_apart() -> dict[str, str]:
    """Under pytest-xdist (make test runs 2 workers) each worker that runs Slurm tests starts its
    own cluster: worker N takes ports 16000 + 500 N .. + 499 and job ids from 1 + 250 N, so two
    clusters never share a daemon port or a multi-node job's rendezvous port (29500 + job id
    modulo 2000, pipeline.engine.slurm_job.rendezvous_port)."""
    import random

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    n = int(worker) % 8 if worker.isdigit() else 0
    return {
        "SLURM_TESTCLUSTER_PORT": str(16000 + 500 * n + random.randrange(0, 496)),
        "SLURM_TESTCLUSTER_FIRST_JOB_ID": str(1 + 250 * n),
    }


def kill_node(conf: Path, node: str, reason: str) -> None:
    """Let `node` of the test cluster die as a machine would: SIGKILL its slurmd, its slurmstepd
    daemons and every process of theirs at once, so nothing reports to slurmctld; then mark it
    DOWN, as slurmctld does once the node misses SlurmdTimeout (300 s by default) of pings."""
    import psutil

    victims = [psutil.Process(int((conf.parent / "run" / f"slurmd-{node}.pid").read_text()))]
    for stepd in _stepds(conf.parent / "spool" / node):
        victims += [stepd, *stepd.children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    subprocess.run(
        ["scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={reason}"], check=True
    )


def revive_node(conf: Path, node: str, timeout_s: float = 60) -> None:
    """Start `node`'s slurmd again (if it is not running) and wait until the node takes jobs:
    with ReturnToService=2 a DOWN node returns to service when its slurmd registers."""
    pidfile = conf.parent / "run" / f"slurmd-{node}.pid"
    try:
        os.kill(int(pidfile.read_text()), 0)
    except (OSError, ValueError):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True
        ).stdout.split()
        if state and state[0] in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{node} did not return to service within {timeout_s}s: {state}")


def _stepds(spool: Path) -> list[Any]:
    """The slurmstepd daemons of the node whose spool directory is `spool` (their sockets are
    there: both nodes are this machine, so nothing else tells them apart)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.NoSuchProcess):
            sockets = proc.net_connections("unix") if proc.info["name"] == "slurmstepd" else []
            if any(str(s.laddr).startswith(f"{spool}{os.sep}") for s in sockets):
                found.append(proc)
    return found
