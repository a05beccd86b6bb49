"""The options of each curation step, as typed blocks of the curate stage's config.

Each block checks what a plan can know (bands x rows against the number of hashes, a Jaccard
threshold the LSH bands cannot reach), so a wrong setting is one line from `--dry-run`. The
quality blocks carry the keyword arguments of datatrove's own filters under the same names, so
their documentation applies unchanged.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_prep.tasks import TaskConfig
from data_prep.text_files import Separator, file_format
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError

Step = Literal["exact", "near", "lines", "quality", "language", "decontaminate"]
STEPS: tuple[Step, ...] = ("exact", "near", "lines", "quality", "language", "decontaminate")
# A pair at the threshold must be a candidate of the LSH bands at least this often.
MIN_CANDIDATE_PROBABILITY = 0.5


class ExactOptions(Strict):
    """Exact duplicates: the same text after whitespace normalisation, across all sources."""

    normalize: Literal["whitespace", "none"] = Field(
        "whitespace",
        description="whitespace: ignore trailing spaces on lines, CRLF vs LF and blank lines at "
        "the ends; none: byte-identical text only",
    )


class NearOptions(Strict):
    """Near duplicates: MinHash over word shingles, LSH in bands x rows, each candidate pair
    confirmed by the Jaccard similarity its full signatures estimate."""

    shingle_size: int = Field(5, ge=1, le=32, description="words per shingle")
    num_hashes: int = Field(112, ge=2, le=1024, description="MinHash functions per document")
    bands: int = Field(14, ge=1, description="LSH bands (datatrove's num_buckets)")
    rows: int = Field(8, ge=1, description="hashes per band (datatrove's hashes_per_bucket)")
    threshold: float = Field(
        0.75,
        gt=0,
        le=1,
        description="estimated Jaccard similarity of shingle sets from which two documents are "
        "near duplicates",
    )
    seed: int = Field(1, description="seed of the hash permutations")
    ignore_numbers: bool = Field(
        False,
        description="compare texts with every number read as 0 (datatrove's default, for web "
        "pages that differ only in dates and prices); off, texts that differ only in their "
        "numbers (task problems, tables) are not duplicates",
    )

    @model_validator(mode="after")
    def _bands_fit(self) -> NearOptions:
        if self.bands * self.rows != self.num_hashes:
            raise ValueError(
                f"bands x rows = {self.bands} x {self.rows} = {self.bands * self.rows}, not "
                f"num_hashes {self.num_hashes}; choose bands and rows whose product is num_hashes "
                f"(e.g. 14 x 8 = 112)"
            )
        reach = 1 - (1 - self.threshold**self.rows) ** self.bands
        if reach < MIN_CANDIDATE_PROBABILITY:
            raise ValueError(
                f"threshold {self.threshold}: {self.bands} bands of {self.rows} rows find a pair "
                f"at that similarity with probability {reach:.3f}; use fewer rows or more bands "
                f"(the LSH threshold (1/bands)^(1/rows) is "
                f"{(1 / self.bands) ** (1 / self.rows):.2f}), or raise threshold"
            )
        return self


class LinesOptions(Strict):
    """Boilerplate lines: a line found in many documents is removed from all of them."""

    min_documents: int = Field(
        20, ge=2, description="documents a line must occur in to be boilerplate"
    )
    min_chars: int = Field(
        20,
        ge=1,
        description="shorter lines (after stripping spaces) are never boilerplate: blank lines, "
        "closing brackets and short code lines repeat for good reasons",
    )


class GopherQuality(Strict):
    """datatrove's GopherQualityFilter (Rae et al. 2021); null disables a rule."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class GopherRepetition(Strict):
    """datatrove's GopherRepetitionFilter: repeated lines, paragraphs and n-grams."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    ]  # fmt: skip


class C4Quality(Strict):
    """datatrove's C4QualityFilter as a document filter (its line edits are not applied)."""

    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class QualityOptions(Strict):
    """Heuristic quality filters, applied in this order; null leaves a filter out."""

    gopher_repetition: GopherRepetition | None = GopherRepetition()
    gopher_quality: GopherQuality | None = GopherQuality()
    c4: C4Quality | None = C4Quality()


class LanguageOptions(Strict):
    """Language identification with py3langid 0.4 (a numpy fork of langid.py: naive Bayes over
    byte n-grams, 140 labels), whose model ships inside the wheel: nothing downloads."""

    keep: list[str] = Field(
        ["en"],
        description="py3langid's codes of the languages to keep (ISO 639-1 where one exists: "
        "en, de, fr, zh, ...; zxx: no language, e.g. much source code); a document detected "
        "as any other is removed",
    )
    min_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="py3langid's probability of the detected language below which a document "
        "is removed even in a kept language (text too short or too mixed to tell)",
    )
    prefix_bytes: int = Field(
        4096,
        ge=64,
        description="score only this many bytes at the start of each document (the model "
        "walks every byte in Python; a few KB identify a language as well as the whole text)",
    )

    @field_validator("keep")
    @classmethod
    def _known(cls, keep: list[str]) -> list[str]:
        if not keep:
            raise ValueError("empty: list at least one language to keep, e.g. [en]")
        labels = language_labels()
        for code in keep:
            if code not in labels:
                close = difflib.get_close_matches(code, labels, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"{code!r} is not a language py3langid identifies; {hint}use one of its "
                    f"codes (ISO 639-1 where one exists): {', '.join(labels)}"
                )
        return keep


@cache
def language_identifier() -> Any:
    """py3langid's bundled model, scoring probabilities (loaded once per process: ~2 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_labels() -> list[str]:
    """The language codes py3langid's bundled model tells apart."""
    return list(language_identifier().labels)


class DecontaminationFile(Strict):
    """A text or JSONL file whose documents must not occur in the training text."""

    path: str
    text_field: str = "text"
    separator: Separator = "blank_line"

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return str(Path(path).expanduser().absolute())

    def check(self) -> None:
        """The file exists and is a format we read."""
        path = Path(self.path)
        if not path.is_file():
            raise PipelineError(f"{self.path}: no such file; check the path or remove it")
        file_format(path)


class DecontaminateOptions(Strict):
    """Remove documents that share an n-gram of words with an evaluation item (GPT-3, OLMo)."""

    ngram: int = Field(13, ge=2, le=64, description="words per n-gram")
    min_item_words: int = Field(
        4,
        ge=1,
        description="an item shorter than `ngram` words is matched whole (GPT-3's rule) when it "
        "has at least this many; shorter items are skipped",
    )
    recipe_tasks: bool = Field(
        True,
        description="the held-out problems of every task the recipe's stages name (eval, sft, "
        "rlhf, pretrain's eval_task, builtin:task sources)",
    )
    tasks: list[TaskConfig] = Field([], description="more tasks whose held-out problems to use")
    ood: bool = Field(
        True,
        description="also the out-of-distribution problems of those tasks (longer operands, more "
        "numbers: what an eval's ood_problems scores)",
    )
    task_problems: int = Field(
        20_000,
        ge=1,
        description="per task whose space is too large to list: the first N held-out problems "
        "in the order eval draws them",
    )
    files: list[DecontaminationFile] = Field(
        [], description="text/JSONL files of evaluation items (e.g. an lm-eval task's documents)"
    )
