"""The curate stage's analysis passes: what every step needs to know of each document, per part.

A pass reads one part's documents once and writes compact per-document records: its size and
source, an exact-duplicate key, boilerplate line keys, a quality verdict, its language and that
language's score, a decontamination match and (through datatrove's signature stage) its MinHash
signature. Nothing is decided here, so
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


class _Verdicts:
    """The filter steps' verdicts on each document: a quality reason, a language and its score,
    a contaminating origin. Reasons and languages are coded by the order the part met them
    (code k: the k-th, 0: none); data_prep.curate_decide maps every part's codes to one table."""

    def __init__(self, cfg: Any, steps: list[Step], contamination: Path | None) -> None:
        from data_prep import curate_steps

        self.quality = curate_steps.Quality(cfg.quality) if "quality" in steps else None
        self.language = cfg.language if "language" in steps else None
        self.contamination = (
            curate_steps.Contamination.load(str(contamination))
            if "decontaminate" in steps and contamination is not None
            else None
        )
        self.reasons: list[str] = []
        self.languages: list[str] = []

    def add(self, text: str, columns: dict[str, array.array]) -> None:
        """Append the verdicts on one document (text "": removed by an earlier pass)."""
        from data_prep import curate_steps

        if self.quality is not None:
            reason = self.quality.reason(text) if text else None
            columns["quality"].append(_code(self.reasons, reason))
        if self.language is not None:
            found, score = (None, 0.0)
            if text:
                found, score = curate_steps.identify_language(text, self.language)
            columns["language"].append(_code(self.languages, found))
            columns["language_score"].append(score)
        if self.contamination is not None:
            columns["contamination"].append(self.contamination.match(text) if text else -1)


def _code(table: list[str], value: str | None) -> int:
    """value's 1-based index in table (added when new); 0 for None."""
    if value is None:
        return 0
    if value not in table:
        table.append(value)
    return table.index(value) + 1


def analyze_part(job: PartJob) -> None:
    """Read the part's documents once and write what the pass's steps need of each."""
    from data_prep import curate_minhash, curate_steps

    cfg = job.config
    steps = phases(cfg.steps)[job.phase]
    started = time.perf_counter()
    job.part_dir.mkdir(parents=True, exist_ok=True)
    verdicts = _Verdicts(cfg, steps, job.contamination)
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
        "language": array.array("h"),
        "language_score": array.array("f"),
        "contamination": array.array("i"),
        "line_counts": array.array("q"),
        "lines": array.array("Q"),
        "emptied": array.array("b"),
    }
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
            verdicts.add(text, columns)
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
    record = {
        "key": job.key,
        "num_documents": num_documents,
        "quality_reasons": verdicts.reasons,
        "languages": verdicts.languages,
    }
    atomic_write_json(
        job.part_dir / PART_FILE,
        {**record, "bytes": int(arrays["sizes"].sum()), "seconds": elapsed},
    )


def read_part(part_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A committed part's record and its per-document arrays."""
    record = json.loads((part_dir / PART_FILE).read_text(encoding="utf-8"))
    with np.load(part_dir / "records.npz") as data:
        return record, {name: data[name] for name in data.files}
