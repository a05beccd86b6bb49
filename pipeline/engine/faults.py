"""Fault injection for the fault tests: `PIPELINE_FAULT=<stage>:<point>[:<n>]` kills the run
with SIGKILL the n-th time (default: the first) that stage passes that point, as a power cut,
the OOM killer or `kill -9` would: no handler runs, nothing is cleaned up or flushed. A rank
kills its launcher first (the other ranks die with it), so the whole run stops at that moment.

Points: `data_write` (tokenize, after a shard is committed; with `parts`, once every part is
encoded and none is merged), `mid_step` (after backward, before
the update), `checkpoint_start` (a checkpoint save begins), `checkpoint_save` (state written, not
yet verified or renamed), `export_start` (an export begins), `export_write` (export written, not
yet renamed), `manifest_write` (the manifest's temp file written, not yet renamed into place).
Unset, a point costs one dictionary lookup.

With `PIPELINE_FAULT_FILL=<file>` the point fills the disk instead of killing: it appends zeros
to <file> until the filesystem reports ENOSPC, so the writes that follow meet a real full disk.
It refuses a filesystem over FILL_LIMIT bytes (the tests use a small tmpfs); deleting <file>
frees the space again.
"""

from __future__ import annotations

import errno
import os
import signal

from pipeline.engine.preempt import LAUNCHER_PID_ENV

ENV = "PIPELINE_FAULT"
FILL_ENV = "PIPELINE_FAULT_FILL"
FILL_LIMIT = 1 << 30
_passes: dict[tuple[str, str], int] = {}


def point(stage: str, name: str) -> None:
    """Die here if PIPELINE_FAULT names this stage and point (and this is its n-th pass)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted_stage, wanted_point, *nth = spec.split(":")
    if (wanted_stage, wanted_point) != (stage, name):
        return
    _passes[stage, name] = passes = _passes.get((stage, name), 0) + 1
    if passes != (int(nth[0]) if nth else 1):
        return
    if os.environ.get(FILL_ENV):
        fill(os.environ[FILL_ENV])
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and int(launcher) != os.getpid():
        os.kill(int(launcher), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def fill(path: str) -> None:
    """Append zeros to `path` until its (small) filesystem is full."""
    stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    if stats.f_blocks * stats.f_frsize > FILL_LIMIT:
        raise RuntimeError(f"{FILL_ENV}={path}: refusing to fill a filesystem over 1 GiB")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 16, 1 << 12):  # then the last partial block
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
