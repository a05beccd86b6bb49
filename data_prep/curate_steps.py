"""What each curation step computes from one document's text: an exact-duplicate key, boilerplate
line keys, a quality verdict (datatrove's Gopher and C4 filters), its language (py3langid) and a
decontamination match.

Language identification is py3langid's, not datatrove's LanguageFilter, because that filter runs
fastText's lid.176 (or GlotLID) model, which it downloads at run time; py3langid's model is in
its wheel, so a stage runs where no network is, and the same installed version scores the same.

Decontamination is ours, not datatrove's NGramsDecontFilter, for two reasons. That filter only
matches n-grams of exactly n words, so an evaluation item shorter than n can never be found, and
every problem of our verifiable tasks is (`Sort 3815: 1358` is 4 words); GPT-3's rule matches
such an item whole, which is what `min_item_words` does here. And it normalises text with
datatrove's simplify_text, which maps every number to 0 and drops punctuation: `What is 27 + 4?
31` and `What is 2 * 2? 4` become the same words, so decontaminating against arithmetic would
remove every arithmetic document. Here words are lower-cased runs of letters and digits, and each
punctuation mark is a word of its own; numbers and operators stay.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from loguru import logger

from data_prep.curate_options import (
    DecontaminateOptions,
    ExactOptions,
    LanguageOptions,
    QualityOptions,
    language_identifier,
)
from data_prep.tasks import (
    ENUMERATE_LIMIT,
    TaskBase,
    format_problem,
    split_size,
    split_space,
    task_problems,
)
from data_prep.text_files import file_documents
from pipeline.engine.errors import PipelineError

logger.disable("datatrove")  # its per-block log lines would bury the stage's own
WORD = re.compile(r"\w+|[^\w\s]")
WINDOW_PRIME = np.uint64(0x100000001B3)
# eval.tasks.EVAL_SEED: the seed eval draws held-out problems with (not imported: eval imports
# data_prep, never the other way round).
EVAL_SEED = 0


def exact_key(text: str, options: ExactOptions) -> bytes:
    """A 128-bit hash of the text as exact deduplication compares it."""
    if options.normalize == "whitespace":
        text = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def line_keys(text: str, min_chars: int) -> set[int]:
    """Hashes of the distinct lines (stripped) long enough to be boilerplate."""
    return {
        xxhash.xxh3_64_intdigest(stripped.encode())
        for line in text.splitlines()
        if len(stripped := line.strip()) >= min_chars
    }


def strip_boilerplate(text: str, boilerplate: set[int], min_chars: int) -> str:
    """The text without its boilerplate lines (each with its line end); other bytes unchanged."""
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if len(stripped := line.strip()) < min_chars
        or xxhash.xxh3_64_intdigest(stripped.encode()) not in boilerplate
    ]
    return "".join(kept)


class Quality:
    """datatrove's Gopher repetition, Gopher quality and C4 filters, run as document filters."""

    def __init__(self, options: QualityOptions) -> None:
        self.filters = []
        if options.gopher_repetition is not None:
            block = GopherRepetitionFilter(**options.gopher_repetition.model_dump())
            self.filters.append(("gopher_repetition", block))
        if options.gopher_quality is not None:
            block = GopherQualityFilter(**options.gopher_quality.model_dump())
            self.filters.append(("gopher_quality", block))
        if options.c4 is not None:
            self.filters.append(("c4", C4QualityFilter(**options.c4.model_dump())))

    def reason(self, text: str) -> str | None:
        """Why the first failing filter rejects the document; None when all pass."""
        for name, block in self.filters:
            verdict = block.filter(DatatroveDocument(text=text, id=""))
            passed, why = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not passed:
                return f"{name}:{why or 'rejected'}"
        return None


def identify_language(text: str, options: LanguageOptions) -> tuple[str, float]:
    """(language code, probability) of the start of the text: its first `prefix_bytes` bytes,
    a character cut at the end dropped."""
    head = text[: options.prefix_bytes].encode("utf-8")[: options.prefix_bytes]
    language, score = language_identifier().classify(head.decode("utf-8", errors="ignore"))
    return str(language), float(score)


def words(text: str) -> list[str]:
    """Decontamination's words: lower-cased letter/digit runs and single punctuation marks."""
    return WORD.findall(text.lower())


def word_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(t.encode()) for t in tokens), np.uint64, len(tokens)
    )


def window_hashes(hashes: np.ndarray, length: int) -> np.ndarray:
    """A hash of every run of `length` consecutive words (the same function for items and text)."""
    count = len(hashes) - length + 1
    if count <= 0:
        return np.empty(0, np.uint64)
    out = np.zeros(count, np.uint64)
    for j in range(length):
        out = out * WINDOW_PRIME + hashes[j : j + count]  # wraps modulo 2**64
    return out


class Contamination:
    """The n-grams of every evaluation item (short items whole), and the documents that hold one.

    `origins` names where items came from (`task sort`, a file); a match reports the index of
    the first matching item's origin.
    """

    def __init__(self, tables: dict[int, tuple[np.ndarray, np.ndarray]], origins: list[str]):
        self.tables = tables  # run length -> (sorted hashes, origin index of each)
        self.origins = origins

    @classmethod
    def build(
        cls, options: DecontaminateOptions, tasks: list[TaskBase]
    ) -> tuple[Contamination, dict[str, int]]:
        """The index of every item; with the number of items per origin (skipped: too short)."""
        found: dict[int, list[tuple[int, int]]] = {}
        origins: list[str] = []
        counts: dict[str, int] = {}
        for origin, items in _items(options, tasks):
            index = len(origins)
            origins.append(origin)
            counts[origin] = 0
            for item in items:
                hashes = word_hashes(words(item))
                length = min(len(hashes), options.ngram)
                if length < options.min_item_words:
                    continue
                counts[origin] += 1
                found.setdefault(length, []).extend(
                    (int(h), index) for h in window_hashes(hashes, length)
                )
        tables = {}
        for length, pairs in found.items():
            array = np.array(sorted(set(pairs)), np.uint64).reshape(-1, 2)
            tables[length] = (array[:, 0].copy(), array[:, 1].astype(np.int32))
        return cls(tables, origins), counts

    def match(self, text: str) -> int:
        """The origin index of an item the text contains, or -1."""
        return min(
            (origin for _, _, origin in self._first_hits(word_hashes(words(text)))), default=-1
        )

    def where(self, text: str) -> tuple[int, int] | None:
        """Character offsets (start, end) of the earliest n-gram of an item the text holds, or
        None (offsets in the lower-cased text: the same as the text's but for a few letters)."""
        spans = [m.span() for m in WORD.finditer(text.lower())]
        hashes = word_hashes([text.lower()[a:b] for a, b in spans])
        return min(
            ((spans[i][0], spans[i + n - 1][1]) for n, i, _ in self._first_hits(hashes)),
            default=None,
        )

    def _first_hits(self, hashes: Any) -> Iterator[tuple[int, int, int]]:
        """Per n-gram length: (length, index of the first window that is an item's, its origin)."""
        for length, (table, origin) in self.tables.items():
            windows = window_hashes(hashes, length)
            if not len(windows):
                continue
            at = np.minimum(np.searchsorted(table, windows), len(table) - 1)
            hits = np.flatnonzero(table[at] == windows)
            if len(hits):
                yield length, int(hits[0]), int(origin[at[hits[0]]])

    def save(self, path: str) -> None:
        arrays = {f"h{n}": t for n, (t, _) in self.tables.items()}
        arrays |= {f"o{n}": o for n, (_, o) in self.tables.items()}
        np.savez(path, origins=np.array(self.origins, dtype=str), **arrays)

    @classmethod
    def load(cls, path: str) -> Contamination:
        with np.load(path) as data:
            lengths = sorted(int(k[1:]) for k in data.files if k.startswith("h"))
            tables = {n: (data[f"h{n}"], data[f"o{n}"]) for n in lengths}
            return cls(tables, [str(o) for o in data["origins"]])


def _items(options: DecontaminateOptions, tasks: list[TaskBase]) -> Iterator[tuple[str, Any]]:
    """(origin, texts) of every task's held-out problems and every listed file's documents."""
    for task in tasks:
        yield task_label(task), _held_out(task, options.task_problems)
        if options.ood and has_ood(task):  # what eval's ood_problems draws
            yield f"{task_label(task)} ood", _held_out(task, options.task_problems, "ood")
    for index, file in enumerate(options.files):
        try:
            file.check()
        except PipelineError as exc:
            raise PipelineError(f"decontaminate.files.{index}: {exc}") from None
        yield f"file {file.path}", file_documents(Path(file.path), file.text_field, file.separator)


def task_label(task: TaskBase) -> str:
    """`task sort`, with the options that differ from the defaults."""
    options = task.model_dump(mode="json", exclude_defaults=True)
    return f"task {task.FAMILY}" + (f" {json.dumps(options, sort_keys=True)}" if options else "")


def has_ood(task: TaskBase) -> bool:
    """Whether the task has an out-of-distribution split (generated tasks do, JSONL ones not)."""
    try:
        task.ood_task()
    except PipelineError:
        return False
    return True


def _held_out(task: TaskBase, limit: int, split: str = "test") -> Iterator[str]:
    """The problems of a held-out split ("test", or "ood") as training text (prompt and
    completion): all of them, or the first `limit` eval would draw when the split is too large
    to list."""
    space, _ = split_space(task, split)
    num = split_size(task, split) if space.size() <= ENUMERATE_LIMIT else limit
    for problem in task_problems(task, split, num, EVAL_SEED):
        yield format_problem(problem)
