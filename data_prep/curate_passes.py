"""The curate stage's analysis passes: what every step needs to know of each document, per part.

A pass reads one part's documents once and writes compact per-document records: its size and
source, an exact-duplicate key, boilerplate line keys, a quality verdict, a decontamination match
and (through datatrove's signature stage) its MinHash signature. Nothing is decided here, so
parts run in any order and in separate processes (or Slurm array tasks); data_prep.curate_decide
reads every part's records and decides in the declared order of the steps.

Steps after `lines` must see the text without its boilerplate lines, which are known only once
every part has counted its lines: they are computed by a second pass (phase 1) over the
documents still kept, with the boilerplate removed. Without `lines`, or with `lines` last, there
is one pass. A part is committed by writing part.json last, so a killed pass redoes only the
parts without one.
"""

from __future__ import annotations

import array
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.curate_options import Step
from data_prep.fanout import Piece, part_documents
from pipeline.engine.manifest import atomic_write_json

PART_FILE = "part.json"
MINHASH_DIR = "minhash"


def phases(steps: list[Step]) -> list[list[Step]]:
    """The steps of each pass: split after `lines` when steps follow it."""
    if "lines" in steps:
        cut = steps.index("lines") + 1
        if cut < len(steps):
            return [steps[:cut], steps[cut:]]
    return [list(steps)]


@dataclass
class PartJob:
    """One part of one pass, picklable for a spawned process."""

    config: Any  # data_prep.curate.Config
    phase: int
    part: int
    folder: Path  # this pass's folder: part_NNNNN/ and minhash/ inside
    key: dict[str, Any]
    pieces: list[Piece] | None = None  # a fan-out part; None: every source, one part
    contamination: Path | None = None  # the decontamination index (npz)
    earlier: Path | None = None  # phase 1: boilerplate line keys and documents already removed
    first_document: int = 0  # global index of the part's first document

    @property
    def part_dir(self) -> Path:
        return self.folder / f"part_{self.part:05d}"

    def texts(self) -> Iterator[tuple[str, int]]:
        """(text, source index) of this part's documents, in order."""
        from data_prep.curate_read import source_documents

        cfg = self.config
        if self.pieces is None:
            return ((doc.text, doc.source) for doc in source_documents(cfg.source))
        return ((text, 0) for text in part_documents(cfg.source[0], self.pieces))


def part_done(job: PartJob) -> bool:
    """Whether the part was written completely by a run with these arguments."""
    try:
        record = json.loads((job.part_dir / PART_FILE).read_text(encoding="utf-8"))
        return record["key"] == job.key
    except (OSError, ValueError, KeyError):
        return False


def analyze_part(job: PartJob) -> None:
    """Read the part's documents once and write what the pass's steps need of each."""
    from data_prep import curate_minhash, curate_steps

    cfg = job.config
    steps = phases(cfg.steps)[job.phase]
    started = time.perf_counter()
    job.part_dir.mkdir(parents=True, exist_ok=True)
    quality = curate_steps.Quality(cfg.quality) if "quality" in steps else None
    contamination = (
        curate_steps.Contamination.load(str(job.contamination))
        if "decontaminate" in steps and job.contamination is not None
        else None
    )
    boilerplate: set[int] = set()
    removed = np.zeros(0, bool)
    if job.earlier is not None:
        with np.load(job.earlier) as earlier:
            boilerplate = set(earlier["boilerplate"].tolist())
            removed = earlier["removed"]
    columns = {
        "sizes": array.array("q"),
        "sources": array.array("h"),
        "exact": array.array("Q"),
        "quality": array.array("h"),
        "contamination": array.array("i"),
        "line_counts": array.array("q"),
        "lines": array.array("Q"),
        "emptied": array.array("b"),
    }
    reasons: list[str] = []
    min_chars = cfg.lines.min_chars

    def each() -> Iterator[Any]:
        from datatrove.data import Document

        for index, (raw, source) in enumerate(job.texts()):
            text = raw
            if job.earlier is not None:
                gone = bool(removed[job.first_document + index])
                text = "" if gone else curate_steps.strip_boilerplate(raw, boilerplate, min_chars)
                columns["emptied"].append(int(not gone and not text.strip()))
            columns["sizes"].append(len(text.encode("utf-8")))
            columns["sources"].append(source)
            if "exact" in steps:
                columns["exact"].extend(
                    np.frombuffer(curate_steps.exact_key(text, cfg.exact), "<u8").tolist()
                )
            if "lines" in steps:
                keys = sorted(curate_steps.line_keys(text, min_chars))
                columns["line_counts"].append(len(keys))
                columns["lines"].extend(keys)
            if quality is not None:
                reason = quality.reason(text) if text else None
                if reason is not None and reason not in reasons:
                    reasons.append(reason)
                columns["quality"].append(0 if reason is None else reasons.index(reason) + 1)
            if contamination is not None:
                columns["contamination"].append(contamination.match(text) if text else -1)
            yield Document(text=text, id=str(index))

    minhash = job.folder / MINHASH_DIR
    if "near" in steps:
        curate_minhash.sign(each(), cfg.near, minhash, job.part)
    else:
        for _ in each():
            pass
    num_documents = len(columns["sizes"])
    if "near" in steps:
        signatures = job.part_dir / curate_minhash.SIGNATURES_FILE
        curate_minhash.gather_signatures(cfg.near, minhash, job.part, num_documents, signatures)
    arrays = {name: np.frombuffer(column, column.typecode) for name, column in columns.items()}
    np.savez(job.part_dir / "records.npz", **arrays)
    elapsed = time.perf_counter() - started
    record = {"key": job.key, "num_documents": num_documents, "quality_reasons": reasons}
    atomic_write_json(
        job.part_dir / PART_FILE,
        {**record, "bytes": int(arrays["sizes"].sum()), "seconds": elapsed},
    )


def read_part(part_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A committed part's record and its per-document arrays."""
    record = json.loads((part_dir / PART_FILE).read_text(encoding="utf-8"))
    with np.load(part_dir / "records.npz") as data:
        return record, {name: data[name] for name in data.files}
