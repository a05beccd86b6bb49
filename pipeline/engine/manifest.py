"""Run-directory manifests, atomic file writes and checksums.

A manifest (`<stage>/stage.json`) is the only record of a stage's state. It is replaced atomically
(temp file, fsync, rename), so a crash leaves either the old manifest or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pipeline.engine import faults
from pipeline.engine.errors import PipelineError
from pipeline.engine.rundir import MANIFEST_FILE

R = TypeVar("R", bound=BaseModel)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.name == MANIFEST_FILE:
            faults.point(path.parent.name, "manifest_write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_tree(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, mtime_ns, sha256}} for every file under `root`."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    record = {}
    for path in files:
        stat = path.stat()
        record[str(path.relative_to(root))] = {
            "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path),
        }  # fmt: skip
    return record


def verify_outputs(
    stage_dir: Path, outputs: dict[str, dict[str, Any]], deep: bool = False
) -> str | None:
    """None when every recorded output is as it was written, else why not.

    The cheap rule `pipeline run` applies to everything it reuses: each file exists with its
    size, and a file whose modification time changed (any write in place, same size or not) is
    checksummed again. `deep` checksums every file (`pipeline status --verify`).
    """
    for rel, meta in outputs.items():
        path = stage_dir / rel
        if not path.is_file():
            return f"output {rel} is missing"
        stat = path.stat()
        if stat.st_size != meta["bytes"]:
            return f"output {rel} changed size"
        touched = meta.get("mtime_ns", stat.st_mtime_ns) != stat.st_mtime_ns
        if (deep or touched) and sha256_file(path) != meta["sha256"]:
            return f"output {rel} fails its checksum"
    return None


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def write_manifest(stage_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(stage_dir / MANIFEST_FILE, manifest)


def update_manifest(stage_dir: Path, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(stage_dir)
    manifest.update(fields)
    write_manifest(stage_dir, manifest)
    return manifest


def read_record(model: type[R], path: Path, writer: str) -> R:
    """A stage's JSON hand-off record as its pydantic `model`, or a one-line error naming the
    file, its first problem ('splits.train.count: Field required') and the `writer` stage kind
    to run or rerun."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run the {writer} stage first")
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        detail = f"{where}: {error['msg']}" if where else error["msg"]
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise PipelineError(f"{path}: unreadable ({detail}); rerun the {writer} stage")


class StageRecord(BaseModel):
    """A stage's manifest as the readers outside the engine see it (the report, baselines that
    quote a stage's training time): typed, and blind to the engine's other fields."""

    model_config = ConfigDict(extra="ignore")

    kind: str | None = None
    status: str | None = None
    error: str | None = None
    note: str | None = None
    headline: str | None = None
    summary: dict[str, Any] = {}
    duration_s: float | None = None
    started_at: str | None = None
    attempts: int = 0

    @field_validator("summary", mode="before")
    @classmethod
    def _no_summary(cls, value: Any) -> Any:
        return value or {}

    @property
    def headline_value(self) -> Any:
        """The summary's value of the stage's headline metric (None without one)."""
        return self.summary.get(self.headline) if self.headline else None


def stage_record(stage_dir: Path) -> StageRecord:
    """The stage's manifest as a StageRecord (empty for a stage that never started)."""
    return StageRecord.model_validate(read_manifest(stage_dir))
