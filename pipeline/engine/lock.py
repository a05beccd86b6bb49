"""One writer per run directory: `pipeline run` and `pipeline submit` hold `<run_dir>/run.lock`.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on that file, which holds a JSON record of the holder
(host, pid, its start time, command, since). The kernel drops a flock when its holder dies, however
it dies, so a crashed run never leaves the directory locked; the record it leaves behind is only a
note for the next holder. Read-only commands (`pipeline status`, `pipeline run --dry-run`) and the
ranks of a stage never take the lock.

What this relies on:
- On one host, flock is exact. A record whose flock is free and whose process is gone (or whose
  pid now belongs to a younger process) is a crashed run: it is taken over with a logged note.
- Across nodes, flock excludes only where the shared filesystem implements it cluster-wide: NFSv4
  (Linux sends flock to the server as a whole-file lock), Lustre mounted with `-o flock`, GPFS,
  BeeGFS. It does not on Lustre `-o localflock` or NFS mounted `nolock`/`local_lock=flock`: there
  each node sees only its own locks. The host + pid record is the fallback: a record naming
  another host is never overridden automatically, even when the flock is free, because this node
  cannot tell whether that process is alive; the message says to delete the file once it is not.
- The record is rewritten in place, never renamed (a flock belongs to an inode), and the file is
  never deleted while locked; a file replaced under a holder is detected and locked again.

`pipeline submit` holds the lock while it plans, writes recipe.yaml and the sbatch files and
queues the jobs, so it neither races a local run nor another submit; the jobs run later, on other
nodes, without the lock. While they are queued or running, `submit` refuses to queue a stage
again and `run` refuses to start (both ask Slurm about the job ids in the manifests).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.engine.errors import PipelineError
from pipeline.engine.rundir import LOCK_FILE

# Exit code of a refusal: the run dir is busy (like a usage error, nothing was done).
BUSY_EXIT_CODE = 2


class RunDirBusy(PipelineError):
    """Another `pipeline run`/`submit` holds the run directory."""

    exit_code = BUSY_EXIT_CODE


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, from /proc), to tell a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie counts as dead)."""
    if Path("/proc/self/stat").exists():
        return process_start_ticks(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_record(command: str) -> dict[str, Any]:
    """What this process writes into the lock file: who holds the run dir, since when."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start_ticks": process_start_ticks(os.getpid()),
        "command": command,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def describe(record: dict[str, Any]) -> str:
    """`pipeline run demo (pid 123 on node7, since ...)`, for messages."""
    return (
        f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on "
        f"{record.get('host', '?')}, since {record.get('since', '?')})"
    )


def read_record(path: Path) -> dict[str, Any]:
    """The holder record in a lock file; {} when absent, empty (released) or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        record = json.loads(text) if text.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def held_by(run_dir: Path) -> dict[str, Any] | None:
    """The record of a holder that may be alive (for `pipeline status`), without locking."""
    record = read_record(run_dir / LOCK_FILE)
    if not record:
        return None
    return None if _is_dead_local_holder(record) else record


def _is_dead_local_holder(record: dict[str, Any]) -> bool:
    """A record of a process on this host that is gone (or whose pid now names another one)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if not pid_alive(record["pid"]):
        return True
    recorded = record.get("pid_start_ticks")
    return recorded is not None and recorded != process_start_ticks(record["pid"])


def _open_locked(path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was deleted or replaced after we opened it: lock the new one


def _refusal(path: Path, record: dict[str, Any], flock_free: bool) -> RunDirBusy:
    run_dir = path.parent
    if not record:
        return RunDirBusy(
            f"{run_dir}: in use by another pipeline process that is starting (lock {path}); "
            f"wait for it to finish or stop it, then rerun"
        )
    holder = describe(record)
    if flock_free:  # another host's record: this node cannot tell whether it still runs
        return RunDirBusy(
            f"{run_dir}: locked by {holder}; if that process is no longer running, delete {path} "
            f"and rerun"
        )
    gone = " (that process is gone; a child it started still holds the lock)"
    return RunDirBusy(
        f"{run_dir}: in use by {holder}{gone if _is_dead_local_holder(record) else ''}; wait for "
        f"it to finish or stop it, then rerun (`pipeline status {run_dir}` is safe meanwhile)"
    )


def _make_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"run_dir {run_dir}: cannot create it ({exc.strerror}); choose a writable run_dir "
            f"(recipe key run_dir, or -o run_dir=PATH)"
        ) from None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the run directory for this process; refuse (RunDirBusy) when another one holds it."""
    _make_dir(run_dir)
    path = run_dir / LOCK_FILE
    fd = _open_locked(path)
    if fd is None:
        raise _refusal(path, read_record(path), flock_free=False)
    owned = False
    try:
        previous = read_record(path)
        if previous and not _is_dead_local_holder(previous):
            raise _refusal(path, previous, flock_free=True)
        if previous:
            print(
                f"note: {run_dir}: taking over the lock left by {describe(previous)}, which is "
                f"no longer running",
                file=sys.stderr,
                flush=True,
            )
        record = holder_record(command or " ".join(["pipeline", *sys.argv[1:]]))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        owned = True
        yield record
    finally:
        if owned:  # released, not crashed: the next holder finds no record to take over
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock
