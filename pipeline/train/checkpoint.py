"""Resumable training state: atomic, checksummed, the newest verified checkpoint wins.

A checkpoint is written by every rank through `accelerator.save_state` into a temporary
directory; rank 0 then records checksums and provenance (the stage config, the code and package
versions) in `meta.json` and renames it to `step_NNNNNNNN/`. A directory without a valid
meta.json (a crash mid-save) is never loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.manifest import atomic_write_json, checksum_tree, sha256_file
from pipeline.train.provenance import provenance

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("pipeline.train.checkpoint")
META = "meta.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    meta: dict[str, Any],
    keep: int,
    config: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state after `step` optimizer steps; keep the newest `keep`.

    `config` is the resolved stage config (JSON form), recorded with the code and package
    versions so that a checkpoint says what made it.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {**meta, "step": step, "provenance": provenance(config)}
        atomic_write_json(tmp / META, {**record, "files": checksum_tree(tmp)})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def verify_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's meta when every file is present with its checksum, else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for rel, info in meta.get("files", {}).items():
        file = path / rel
        if (
            not file.is_file()
            or file.stat().st_size != info["bytes"]
            or sha256_file(file) != info["sha256"]
        ):
            log.warning(
                "checkpoint %s: %s is damaged; falling back to an older one", path.name, rel
            )
            return None
    return meta


def latest_checkpoint(
    root: Path, fingerprint: str, max_step: int | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint (at most `max_step` steps in) that verifies and was written by the same
    stage configuration."""
    for path in reversed(list_checkpoints(root)):
        if max_step is not None and int(path.name.removeprefix("step_")) > max_step:
            continue
        meta = verify_checkpoint(path)
        if meta is None:
            continue
        if meta.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s: written by a different config; ignoring it", path.name)
            continue
        return path, meta
    return None
