"""The curate stage's decisions: which documents each step removes, in the declared order.

The parts' records (data_prep.curate_passes) are read in order, so document ids are global:
part k's first document comes after every document of parts 0..k-1, whatever the number of
parts, and every decision below is a function of those ids alone. That is what makes the output
of N parts byte-identical to one. Each step sees only the documents the steps before it kept:
exact duplicates keep the earliest copy, a near duplicate goes when it is confirmed against a
document kept before it, and a line is boilerplate when enough kept documents hold it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import curate_confirm, curate_minhash
from data_prep.curate_options import LanguageOptions, Step
from data_prep.curate_passes import MINHASH_DIR, phases, read_part
from data_prep.curate_read import source_documents
from data_prep.curate_steps import strip_boilerplate


@dataclass
class Decisions:
    """Per document: which step removed it (0: kept), and why."""

    steps: list[Step]
    fate: np.ndarray  # int8: 0 kept, k: removed by steps[k - 1]
    kept: np.ndarray  # int64: the document kept in its place (duplicates), else -1
    score: np.ndarray  # float32: estimated Jaccard with the kept document (near), language
    # score (language), else NaN
    detail: np.ndarray  # int32: index into details (quality reason, language, contaminating
    # origin), else -1
    details: list[str] = field(default_factory=list)
    boilerplate: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    cluster_sizes: Counter[int] = field(default_factory=Counter)
    language: LanguageOptions | None = None  # the language step's options, for its reasons

    def removed_by(self, step: Step) -> np.ndarray:
        return self.fate == self.steps.index(step) + 1

    def fields(self, index: int) -> dict[str, Any]:
        """What a removed document's record holds besides its reason: the id of the copy kept
        (duplicates), or the language found and its score (language)."""
        if self.kept[index] >= 0:
            return {"kept_id": int(self.kept[index])}
        if self.steps[self.fate[index] - 1] == "language":
            language = self.details[self.detail[index]]
            return {"language": language, "language_score": round(float(self.score[index]), 4)}
        return {}

    def reason(self, index: int) -> str:
        """One line: why document `index` was removed."""
        step = self.steps[self.fate[index] - 1]
        if step == "exact":
            return f"exact duplicate of document {self.kept[index]}"
        if step == "near":
            return (
                f"near duplicate of document {self.kept[index]} "
                f"(estimated Jaccard {self.score[index]:.3f})"
            )
        if step == "lines":
            return "nothing left after removing boilerplate lines"
        if step == "quality":
            return self.details[self.detail[index]]
        if step == "language":
            language, score = self.details[self.detail[index]], self.score[index]
            assert self.language is not None
            why = (
                f"below min_score {self.language.min_score}"
                if language in self.language.keep
                else f"not in keep [{', '.join(self.language.keep)}]"
            )
            return f"language {language} (score {score:.3f}): {why}"
        return f"contains an item of {self.details[self.detail[index]]}"


class _Phase:
    """Every part's records of one pass, concatenated in document order."""

    def __init__(self, folder: Path, parts: int) -> None:
        self.folder = folder
        records = [read_part(folder / f"part_{k:05d}") for k in range(parts)]
        self.part_dirs = [folder / f"part_{k:05d}" for k in range(parts)]
        counts = [record["num_documents"] for record, _ in records]
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        self.arrays = {
            name: np.concatenate([arrays[name] for _, arrays in records]) for name in records[0][1]
        }
        self.quality_reasons = self._recode(records, "quality", "quality_reasons")
        self.languages = self._recode(records, "language", "languages")

    def _recode(self, records: list[Any], column: str, key: str) -> list[str]:
        """One sorted table of what every part's `key` lists, and `column` recoded to index it
        (+1; 0: none): each part coded by the order it met them."""
        tables = [record.get(key, []) for record, _ in records]
        merged = sorted({value for table in tables for value in table})
        codes = []
        for (_, arrays), part in zip(records, tables, strict=True):
            table = np.array([0] + [merged.index(value) + 1 for value in part], np.int32)
            codes.append(table[arrays[column]] if len(arrays[column]) else arrays[column])
        self.arrays[column] = np.concatenate(codes)
        return merged


def decide(
    config: Any, folders: list[Path], parts: int, origins: list[str], upto: int | None = None
) -> Decisions:
    """Apply the first `upto` steps (all by default) to the records of the passes in `folders`."""
    steps: list[Step] = list(config.steps)[: upto if upto is not None else len(config.steps)]
    passes = [_Phase(folder, parts) for folder in folders]
    groups = phases(list(config.steps))
    phase_of = {step: k for k, group in enumerate(groups) for step in group}
    size = len(passes[0].arrays["sizes"])
    decisions = Decisions(
        steps=list(config.steps),
        fate=np.zeros(size, np.int8),
        kept=np.full(size, -1, np.int64),
        score=np.full(size, np.nan, np.float32),
        detail=np.full(size, -1, np.int32),
    )
    for position, step in enumerate(steps, start=1):
        phase = passes[phase_of[step]]
        alive = decisions.fate == 0
        if len(groups) > 1 and step == groups[1][0]:  # what boilerplate removal left empty
            _remove(decisions, alive & (phase.arrays["emptied"] == 1), steps.index("lines") + 1)
            alive = decisions.fate == 0
        if step == "exact":
            _exact(decisions, phase.arrays["exact"].reshape(-1, 2), alive, position)
        elif step == "near":
            _near(decisions, phase, config, alive, position, phase_of["near"] == 1)
        elif step == "lines":
            decisions.boilerplate = _boilerplate(phase.arrays, alive, config.lines.min_documents)
        elif step == "quality":
            codes = phase.arrays["quality"]
            hit = alive & (codes > 0)
            base = len(decisions.details)
            decisions.details += phase.quality_reasons
            decisions.detail[hit] = base + codes[hit] - 1
            _remove(decisions, hit, position)
        elif step == "language":
            _language(decisions, phase, config.language, alive, position)
        else:
            found = phase.arrays["contamination"]
            hit = alive & (found >= 0)
            base = len(decisions.details)
            decisions.details += origins
            decisions.detail[hit] = base + found[hit]
            _remove(decisions, hit, position)
    return decisions


def _language(
    decisions: Decisions, phase: _Phase, options: LanguageOptions, alive: np.ndarray, position: int
) -> None:
    """Among the kept documents, those whose language is not kept or scores below min_score
    (a document with no text to score stays)."""
    codes, scores = phase.arrays["language"], phase.arrays["language_score"]
    kept = np.array([0] + [lang in options.keep for lang in phase.languages], bool)
    hit = alive & (codes > 0) & (~kept[codes] | (scores < options.min_score))
    base = len(decisions.details)
    decisions.details += phase.languages
    decisions.detail[hit] = base + codes[hit] - 1
    decisions.score[hit] = scores[hit]
    decisions.language = options
    _remove(decisions, hit, position)


def _remove(decisions: Decisions, mask: np.ndarray, position: int) -> None:
    decisions.fate[mask] = position


def _exact(decisions: Decisions, keys: np.ndarray, alive: np.ndarray, position: int) -> None:
    """Among the kept documents, every copy after the first of each key."""
    ids = np.flatnonzero(alive)
    if not len(ids):
        return
    _, first, inverse = np.unique(keys[ids], axis=0, return_index=True, return_inverse=True)
    kept_for = ids[first][inverse.reshape(-1)]
    copies = kept_for != ids
    decisions.kept[ids[copies]] = kept_for[copies]
    decisions.fate[ids[copies]] = position


def _near(
    decisions: Decisions,
    phase: _Phase,
    config: Any,
    alive: np.ndarray,
    position: int,
    stripped: bool,
) -> None:
    """Near duplicates among the kept documents: each confirmed against an earlier one kept, by
    its signature's estimate and by its shingles (data_prep.curate_confirm). `stripped`: the
    step saw the texts without their boilerplate lines."""
    options = config.near
    dups = phase.folder / "dups"
    chains = curate_minhash.candidate_pairs(options, phase.folder / MINHASH_DIR, dups)
    groups = [
        group
        for chain in chains
        for group in curate_minhash.band_groups(curate_minhash.global_pairs(chain, phase.offsets))
    ]
    wanted = [group[alive[group]] for group in groups]
    wanted = np.unique(np.concatenate([np.empty(0, np.int64), *[w for w in wanted if len(w) > 1]]))
    shingles = curate_confirm.gather(
        _texts(config, decisions, stripped), wanted, options, phase.folder / "shingles.bin"
    )
    signature = curate_minhash.signature_reader(phase.part_dirs, phase.offsets)
    removed, sizes = curate_minhash.clusters(
        groups, alive, signature, options.threshold, shingles.jaccard
    )
    for index, (kept, similarity) in removed.items():
        decisions.fate[index] = position
        decisions.kept[index] = kept
        decisions.score[index] = similarity
    decisions.cluster_sizes = sizes


def _texts(config: Any, decisions: Decisions, stripped: bool) -> Iterator[str]:
    """Every document's text as the near step saw it, in order."""
    boilerplate = set(decisions.boilerplate.tolist())
    for doc in source_documents(config.source):
        yield (
            strip_boilerplate(doc.text, boilerplate, config.lines.min_chars)
            if stripped
            else doc.text
        )


def _boilerplate(
    arrays: dict[str, np.ndarray], alive: np.ndarray, min_documents: int
) -> np.ndarray:
    """Line keys held by at least `min_documents` kept documents (each counts a line once)."""
    lines = arrays["lines"][np.repeat(alive, arrays["line_counts"])]
    values, documents = np.unique(lines, return_counts=True)
    return values[documents >= min_documents]
