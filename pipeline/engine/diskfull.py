"""A full disk (or quota) while a stage writes a checkpoint or an export: one line, nothing lost.

`writing(what, where, partial)` wraps such a write. When it fails because the filesystem is full,
the partial output is removed (the previous checkpoint, the one a rerun resumes from, is never
touched: every write goes to a temporary directory first) and `DiskFull` says, in one line, what
was being written where, how much space is left and what to do. Any other error passes through.

"Because the filesystem is full" is decided from the error and the disk, not the message alone:
`torch.save` on a full disk raises `RuntimeError('[enforce fail at inline_container.cc] ...
unexpected pos ...')`, safetensors a `SafetensorError` naming os error 28, Python `OSError`
ENOSPC or EDQUOT. So: an OSError with one of those errnos, a message naming one, or (any error)
less than `NEARLY_FULL` bytes left on the filesystem where it was writing.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.engine.errors import PipelineError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_MESSAGES = ("no space left", "os error 28", "os error 122", "quota exceeded")
NEARLY_FULL = 1 << 20  # bytes


class DiskFull(PipelineError):
    """A write failed because its filesystem is full; freeing space and rerunning resumes."""


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


def is_disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    if any(text in str(exc).lower() for text in FULL_MESSAGES):
        return True
    return nearly_full(where)


def nearly_full(where: Path) -> bool:
    """Under NEARLY_FULL bytes left on the filesystem holding `where`."""
    free = free_bytes(where)
    return free is not None and free < NEARLY_FULL


def human(size: int | None) -> str:
    if size is None:
        return "unknown space"
    power = next((p for p in (3, 2, 1) if size >= 1024**p), 0)
    unit = ("B", "KiB", "MiB", "GiB")[power]
    return f"{size} B" if power == 0 else f"{size / 1024**power:.1f} {unit}"


def message(what: str, where: Path, hint: str = "", resume: str = "") -> str:
    return (
        f"{where}: no space left on device while writing {what} ({human(free_bytes(where))} "
        f"free); free space{hint}, then rerun the same command to resume{resume}"
    )


@contextmanager
def writing(
    what: str, where: Path, partial: Path | None = None, hint: str = "", resume: str = ""
) -> Iterator[None]:
    """Turn a full-disk failure inside the block into `DiskFull`, removing `partial` first."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PipelineError) or not is_disk_full(exc, where):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise DiskFull(message(what, where, hint, resume)) from None


def explained(exc: BaseException, what: str, where: Path) -> BaseException:
    """`exc` as `DiskFull` when a full disk under `where` caused it (a stage's own guards name
    the checkpoint or export; this catches the writes no guard wraps), else `exc` itself."""
    usable = isinstance(exc, Exception) and not isinstance(exc, PipelineError)
    return DiskFull(message(what, where)) if usable and is_disk_full(exc, where) else exc
