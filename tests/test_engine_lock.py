"""The run-directory lock (pipeline/engine/lock.py): one `pipeline run`/`submit` per run dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine.errors import PipelineError
from pipeline.engine.lock import RunDirBusy, read_record, run_dir_lock
from pipeline.engine.manifest import read_manifest
from pipeline.engine.rundir import LOCK_FILE
from tests.helpers import ROOT, cli, tiny_recipe, write_recipe

HOLD = """
import sys
from pathlib import Path
from pipeline.engine.lock import run_dir_lock
with run_dir_lock(Path(sys.argv[1]), "pipeline run held-by-test"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run dir's lock (through the same code `pipeline run` uses)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _tokenizer_only(tmp_path: Path) -> Path:
    """A recipe whose one stage takes seconds."""
    data = tiny_recipe(tmp_path / "runs" / "tiny")
    data["stages"] = {"tokenizer": data["stages"]["tokenizer"]}
    return write_recipe(tmp_path / "tiny.yaml", data)


def test_a_second_holder_in_the_same_process_is_refused_and_release_clears_the_record(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir, "pipeline run first") as record:
        assert read_record(run_dir / LOCK_FILE) == record
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunDirBusy) as refused, run_dir_lock(run_dir, "pipeline run second"):
            pass
        message = str(refused.value)
        assert "`pipeline run first`" in message and f"pid {os.getpid()}" in message
        assert "\n" not in message
    assert (run_dir / LOCK_FILE).read_text() == ""  # released: nothing left to take over
    with run_dir_lock(run_dir, "pipeline run third"):
        pass


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PipelineError) as error, run_dir_lock(blocker / "run"):
        pass
    assert "cannot create" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.e2e
def test_a_second_run_refuses_naming_the_holder_while_status_and_dry_run_work(
    tmp_path: Path,
) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs" / "tiny"))
    run_dir = tmp_path / "runs" / "tiny"
    holder = _holder(run_dir)
    try:
        for command in (["run", str(recipe)], ["submit", str(recipe), "--dry-run"]):
            result = cli(*command)
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            for part in (f"pid {holder.pid}", socket.gethostname(), "held-by-test", "since"):
                assert part in lines[0], (part, lines[0])
        assert read_manifest(run_dir / "tokenizer") == {}  # the refused run did nothing
        assert not (run_dir / "recipe.yaml").exists()
        plan = cli("run", str(recipe), "--dry-run")
        assert plan.returncode == 0 and "never run" in plan.stdout, plan.stderr
        status = cli("status", str(recipe))
        assert status.returncode == 0, status.stderr
        assert f"in use by `pipeline run held-by-test` (pid {holder.pid}" in status.stdout
    finally:
        holder.communicate("")
    assert holder.returncode == 0


@pytest.mark.e2e
def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    recipe = _tokenizer_only(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    holder = _holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_record(run_dir / LOCK_FILE)["pid"] == holder.pid  # the crash left its record
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "taking over the lock left by `pipeline run held-by-test`" in result.stderr
    assert f"pid {holder.pid}" in result.stderr
    assert read_manifest(run_dir / "tokenizer")["status"] == "done"
    assert (run_dir / LOCK_FILE).read_text() == ""


@pytest.mark.e2e
def test_a_record_from_another_host_is_not_overridden(tmp_path: Path) -> None:
    """Where flock is node-local (Lustre localflock, NFS nolock) a free flock proves nothing
    about another node's holder: its record stands until someone deletes it."""
    recipe = _tokenizer_only(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    record = {"host": "node-elsewhere", "pid": 4242, "command": "pipeline run tiny"}
    (run_dir / LOCK_FILE).write_text(json.dumps({**record, "since": "2026-01-01T00:00:00"}))
    result = cli("run", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "pid 4242 on node-elsewhere" in result.stderr
    assert f"delete {run_dir / LOCK_FILE}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (run_dir / LOCK_FILE).unlink()
    assert cli("run", str(recipe)).returncode == 0
