"""The data signature of an image folder from a cached listing, so planning lists no unchanged
directory again.

`folder_signature(root)` is what the images stage's `data_signature()` holds for a folder: the
number of files under it and a sha256 over every file's (relative path, size, mtime_ns), the
same facts a full walk gives. What is walked is what the images stage can read: every file under
the root (symlinks to files followed); the root's subdirectories through symlinks (class folders
may be links), deeper ones not (as `Path.rglob`); an unreadable directory counts as empty.

The rule. A cache file (`cache_path`) keeps, for every directory under the root, its stamp
(inode, mtime_ns, ctime_ns) and the sorted names of its files and subdirectories. Each plan
1. stats every directory: one that is new, whose stamp differs from the cached one, or whose
   cached stamp is missing (racy, below) is listed again (scandir); the others reuse their names;
2. stats every file (never reads one) and hashes the fresh (path, size, mtime_ns).

Guarantees. Adding, removing or renaming an entry changes its directory's mtime and ctime, so
step 1 lists it again; a file changed in place gets a new mtime, so step 2 sees it. The
signature therefore equals a full walk's: the cache saves directory reads, never decides whether
a file changed. A directory whose mtime and ctime are both within RACY_NS of the time it was
listed is stored without a stamp (a change in the same timestamp tick would keep both) and is
listed again until it is older; ctime, which no tool can set back, is part of the stamp, so a
directory mtime restored by hand (touch -d, tar, rsync -a) does not hide a change either. A cache
that is missing, does not parse, fails its checksum, was written for another root or format, or
names an entry that is gone is ignored and rebuilt; one that cannot be written is skipped.
Not seen, exactly as before this cache: a file rewritten with the same size and then given its
old mtime back (cp -p, rsync -a over an equal-sized file), an in-place edit of the same size in
the same timestamp tick as the previous plan's stat of it, and for directories a clock skew
beyond RACY_NS between this host and a network file server.

Cost, measured on 100k 8x8 PNGs in 100 folders on local disk (2 busy cores): old signature
(pathlib rglob, two stats per file, Path sorting) 3.1 s; a full walk here 1.0-1.3 s; with the
cache whole 0.7-1.0 s, of which loading the cache and stamping 101 directories is 0.02-0.03 s and
the rest is the one stat per file that catches in-place edits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_bytes

FORMAT = "image-listing/1"
CACHE_ENV = "PIPELINE_CACHE_DIR"
RACY_NS = 3 * 10**9  # above every common timestamp granularity (FAT: 2 s)

# rel dir ("" = root) -> [stamp [inode, mtime_ns, ctime_ns] or None, file names, subdir names]
Dirs = dict[str, list[Any]]


@dataclass(frozen=True)
class Listing:
    """A folder's signature and how much of it had to be listed again."""

    files: int
    sha256: str
    dirs_listed: int


def cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/pretrain-pipeline, else ~/.cache/...."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pretrain-pipeline"


def cache_path(root: Path) -> Path:
    """Where the listing of `root` is cached: one file per absolute folder path."""
    key = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:32]
    return cache_dir() / "image-listings" / f"{key}.json"


def folder_signature(root: Path, cache: Path | None = None) -> Listing:
    """Count and sha256 of every file's (path, size, mtime_ns) under `root` (module docstring)."""
    root_text = str(Path(root).absolute())
    cache = cache or cache_path(root)
    cached = _load(cache, root_text)
    if cached:
        try:
            return _signature(root_text, cached, cache)
        except (OSError, LookupError, TypeError, ValueError):
            pass  # a cached name is gone or the cache is malformed: list everything again
    try:
        return _signature(root_text, {}, cache)
    except OSError as exc:
        raise PipelineError(
            f"source {root_text}: cannot read {exc.filename} ({exc.strerror}); fix the path or "
            f"its permissions, and do not change the folder while a run is planned"
        ) from None


def _signature(root: str, cached: Dirs, cache: Path) -> Listing:
    """The signature from fresh stats and the names of `cached` where still valid; saves it."""
    dirs, listed = _refresh(root, cached)
    count, digest = _digest(root, dirs)
    if dirs != cached:
        _save(cache, root, dirs)
    return Listing(count, digest, listed)


def _refresh(root: str, cached: Dirs) -> tuple[Dirs, int]:
    """Every directory's entry, reusing cached names where the stamp is unchanged."""
    now = time.time_ns()
    dirs: Dirs = {}
    listed = 0
    pending = [""]
    while pending:
        rel = pending.pop()
        path = f"{root}/{rel}" if rel else root
        info = os.stat(path)
        stamp = [info.st_ino, info.st_mtime_ns, info.st_ctime_ns]
        entry = cached.get(rel)
        if entry is None or entry[0] is None or entry[0] != stamp:
            files, subdirs = _list_dir(path, follow_links=not rel)
            # A change now sets mtime and ctime to now: unseen only if both already are.
            recent = min(info.st_mtime_ns, info.st_ctime_ns) > now - RACY_NS
            entry = [None if recent else stamp, files, subdirs]
            listed += 1
        dirs[rel] = entry
        pending += [f"{rel}/{name}" if rel else name for name in entry[2]]
    return dirs, listed


def _list_dir(path: str, follow_links: bool) -> tuple[list[str], list[str]]:
    """(sorted file names, sorted subdirectory names) of one directory; empty if unreadable."""
    files, subdirs = [], []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=follow_links):
                    subdirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
    except PermissionError:
        return [], []
    return sorted(files), sorted(subdirs)


def _digest(root: str, dirs: Dirs) -> tuple[int, str]:
    """(file count, sha256 over each directory's files with their fresh size and mtime_ns)."""
    digest = hashlib.sha256()
    count = 0
    for rel in sorted(dirs):
        base = f"{root}/{rel}" if rel else root
        names = dirs[rel][1]
        stats = [os.stat(f"{base}/{name}") for name in names]
        sizes = [s.st_size for s in stats]
        mtimes = [s.st_mtime_ns for s in stats]
        digest.update(json.dumps([rel, names, sizes, mtimes]).encode())
        count += len(names)
    return count, digest.hexdigest()


def _load(cache: Path, root: str) -> Dirs:
    """The cached directories of `root`, or {} when the cache is missing or not to be trusted."""
    try:
        head, _, body = cache.read_bytes().partition(b"\n")
        fmt, _, checksum = head.decode("ascii").partition(" ")
        if fmt != FORMAT or hashlib.sha256(body).hexdigest() != checksum:
            return {}
        data = json.loads(body)
        if data["root"] != root or not isinstance(data["dirs"], dict):
            return {}
        return data["dirs"]
    except (OSError, ValueError, LookupError, TypeError):
        return {}


def _save(cache: Path, root: str, dirs: Dirs) -> None:
    """Write the cache (format line with the body's sha256, then JSON); skipped if unwritable."""
    body = json.dumps({"root": root, "dirs": dirs}, separators=(",", ":")).encode()
    try:
        atomic_write_bytes(cache, f"{FORMAT} {hashlib.sha256(body).hexdigest()}\n".encode() + body)
    except OSError:
        return
