"""A private two-node Slurm cluster for the tests (slurm/testcluster.sh), or a skip saying why not."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
        [str(SCRIPT), "start", str(directory)], capture_output=True, text=True, timeout=120
    )
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
