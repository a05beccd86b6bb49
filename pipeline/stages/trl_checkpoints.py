"""Which TRL checkpoint a rerun resumes from.

A checkpoint is complete when every rank finished saving it. The Trainer writes
trainer_state.json last, on rank 0 only, and each rank its own RNG state, so a kill during a save
can leave a checkpoint that looks whole on rank 0 while another rank had not yet written its
part. Every rank therefore leaves a marker `saved-rank{r}-of{world}` once its save is done (a
callback's on_save), and a checkpoint of several ranks in a directory that began with markers
(MARKERS_FILE) is complete only with all of them. One process's checkpoints, and those from
before markers, are judged as before: trainer_state.json whole (it parses) and every RNG file
whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.engine.context import StageContext
from pipeline.engine.manifest import atomic_write_text

FINGERPRINT_FILE = "fingerprint.txt"
MARKERS_FILE = "saved-markers.txt"  # in a checkpoint directory whose checkpoints have markers
SAVED = re.compile(r"saved-rank(\d+)-of(\d+)")
TRASH_PREFIX = ".removed-"  # in the stage directory: what rank 0 renamed away to delete


def prepare_checkpoints(ctx: StageContext) -> str | None:
    """The newest complete TRL checkpoint of this configuration to resume from.

    Checkpoints of another configuration are removed, and so are incomplete ones (a kill during
    a save). Every rank judges for itself while rank 0 removes, so rank 0 first renames what it
    removes out of the `checkpoint-*` pattern (atomically): another rank sees a checkpoint whole,
    as the kill left it, or not at all, never half deleted (rank 0 removing an incomplete
    checkpoint-4 could otherwise look like a complete one to rank 1, which would then resume
    from it while rank 0 resumed from checkpoint-2). Each rank reads the fingerprint before it
    looks for checkpoints, so it never pairs checkpoints of another configuration with the
    fingerprint rank 0 has just written; rank 0 replaces that file atomically (rewritten in
    place, it was empty for a moment, and a rank reading it then took every checkpoint for
    another configuration's and started from step 0 while rank 0 resumed: a hang).
    """
    marker = ctx.checkpoint_dir / FINGERPRINT_FILE
    stale = marker.is_file() and marker.read_text() != ctx.fingerprint
    found: list[Path] = []
    if ctx.checkpoint_dir.is_dir() and not stale:
        found = [p for p in ctx.checkpoint_dir.glob("checkpoint-*") if p.name[11:].isdigit()]
    marked = (ctx.checkpoint_dir / MARKERS_FILE).is_file()
    complete = [p for p in found if checkpoint_complete(p, marked)]
    if ctx.is_main:
        trash = ctx.checkpoint_dir.parent  # the stage directory
        for leftover in trash.glob(f"{TRASH_PREFIX}*"):  # a removal a kill cut short
            shutil.rmtree(leftover, ignore_errors=True)
        if stale:
            ctx.log.info("removing the checkpoints of another configuration")
            discard(ctx.checkpoint_dir, trash)
        for partial in set(found) - set(complete):
            ctx.log.warning("removing incomplete checkpoint %s", partial.name)
            discard(partial, trash)
        ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():  # new, or gone with the stale checkpoints; written atomically:
            atomic_write_text(marker, ctx.fingerprint)  # never empty while another rank reads it
        if stale or not found:  # checkpoints made from now on carry markers
            (ctx.checkpoint_dir / MARKERS_FILE).write_text("every rank marks its saves\n")
    newest = max(complete, key=lambda p: int(p.name[11:]), default=None)
    return str(newest) if newest else None


def discard(path: Path, trash_dir: Path) -> None:
    """Remove a directory that other ranks may be reading: renamed into `trash_dir` first (atomic
    on one filesystem) so that it vanishes at once, then deleted."""
    trash = trash_dir / f"{TRASH_PREFIX}{path.name}-{os.getpid()}"
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_complete(checkpoint: Path, marked: bool) -> bool:
    """Whether every rank finished saving `checkpoint`: all its ranks' markers (`marked`, for a
    save by several ranks: their RNG files are rng_state_{rank}.pth); for one process, or a
    checkpoint from before markers, a whole trainer_state.json (written last) and RNG files."""
    if marked and any(checkpoint.glob("rng_state_*.pth")):
        saved = [SAVED.fullmatch(p.name) for p in checkpoint.glob("saved-rank*-of*")]
        ranks = {int(m[1]) for m in saved if m}
        worlds = {int(m[2]) for m in saved if m}
        return len(worlds) == 1 and ranks == set(range(worlds.pop()))
    return state_whole(checkpoint) and rng_whole(checkpoint)


def state_whole(checkpoint: Path) -> bool:
    """Whether trainer_state.json is there and whole: the Trainer writes it in place, so a kill
    mid-write leaves a file that exists but is empty or cut short."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def rng_whole(checkpoint: Path) -> bool:
    """Whether every RNG state file of a TRL checkpoint is whole: torch.save writes a zip
    archive, whose directory comes last, so a file cut short does not open."""
    import zipfile

    for path in checkpoint.glob("rng_state*.pth"):
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return False
        except (zipfile.BadZipFile, OSError):
            return False
    return True


def saved_marker_callback() -> Any:
    """A TrainerCallback that marks, on every rank, each checkpoint this rank finished saving
    (the Trainer calls on_save after its whole save, on every rank)."""
    from transformers import TrainerCallback

    class SavedMarker(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            name = f"saved-rank{args.process_index}-of{args.world_size}"
            with contextlib.suppress(FileNotFoundError):  # rotated away by rank 0 meanwhile
                (checkpoint / name).write_text("")

    return SavedMarker()
