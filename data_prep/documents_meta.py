"""The curate stage's hand-off record (documents.json): where the kept documents of each source are,
what each step removed, and how a consumer reads them.

`tokenizer` and `tokenize` name a curate stage (`documents: STAGE`) instead of a `source`; they
read its kept shards as JSONL sources that carry the curate stage's source names, weights, repeats
and on_exhausted, so a mixture's weights apply to the curated documents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ValidationError

from data_prep.sources import SourceConfig
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, read_record

if TYPE_CHECKING:
    from pipeline.engine.context import StageContext

DOCUMENTS_FILE = "documents.json"
KEPT_DIR = "kept"
REMOVED_DIR = "removed"
SUFFIXES = {"zstd": ".jsonl.zst", "gzip": ".jsonl.gz"}


class Counts(BaseModel):
    """Documents and UTF-8 bytes of text."""

    documents: int = 0
    bytes: int = 0


class SourceRecord(BaseModel):
    """One source of the curate stage: what was read and kept, and how to mix it downstream."""

    name: str
    uri: str
    weight: float | None = None
    repeat: int = 1
    on_exhausted: Literal["stop", "cycle"] = "stop"
    read: Counts
    kept: Counts
    shards: list[str]  # relative to the export directory


class StepRecord(BaseModel):
    """What one step removed, per source name; `lines` also counts the lines it cut out of
    documents it kept (documents: lines, bytes: their bytes)."""

    step: str
    removed: dict[str, Counts]
    lines_cut: dict[str, Counts] = {}
    examples: list[str] = []  # the first few removals: "document 12 (source): reason"


class DocumentsMeta(BaseModel):
    """What a curate export holds."""

    compression: Literal["zstd", "gzip"]
    steps: list[StepRecord]
    sources: list[SourceRecord]
    removed_shards: dict[str, list[str]]  # step -> shards under removed/<step>/
    cluster_sizes: dict[int, int] = {}  # near duplicates: cluster size -> clusters
    decontaminated_against: dict[str, int] = {}  # origin -> items searched for

    def write(self, export_dir: Path) -> None:
        atomic_write_json(Path(export_dir) / DOCUMENTS_FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, export_dir: Path) -> DocumentsMeta:
        return read_record(cls, Path(export_dir) / DOCUMENTS_FILE, "curate")

    def source_configs(self, export_dir: Path) -> list[SourceConfig]:
        """The kept documents of each source as a JSONL source with the curate stage's mixing."""
        sources = []
        for source in self.sources:
            if not source.shards:
                raise PipelineError(
                    f"{export_dir}: the curate stage kept no document of source {source.name}; "
                    f"loosen its steps or remove the source"
                )
            folder = Path(export_dir) / KEPT_DIR / source.name
            sources.append(
                SourceConfig(
                    uri=str(folder / f"*{SUFFIXES[self.compression]}"),
                    name=source.name,
                    weight=source.weight,
                    repeat=source.repeat,
                    on_exhausted=source.on_exhausted,
                )
            )
        return sources


def check_source_or_documents(source: list[SourceConfig], documents: str | None) -> None:
    """A consumer reads a source or a curate stage's documents, not both (ValueError)."""
    if documents is not None and source:
        raise ValueError(
            f"both `source` and documents: {documents}; keep one (the curate stage reads the "
            f"source itself)"
        )


def with_documents(ctx: StageContext) -> StageContext:
    """The context with the stage's `source` set to the kept documents of its `documents:` stage
    (unchanged when it names none), so the rest of the stage reads them as any source."""
    cfg = ctx.config
    if getattr(cfg, "documents", None) is None:
        return ctx
    found = ctx.input("documents")
    sources = DocumentsMeta.read(found.path).source_configs(found.path)
    data = {**cfg.model_dump(), "source": [s.model_dump() for s in sources], "documents": None}
    try:
        resolved = type(cfg).model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise PipelineError(
            f"stages.{ctx.name}: the documents of {found.stage} do not fit: {error['msg']}"
        ) from None
    stages = {**ctx.recipe.stages, ctx.name: resolved}
    return dataclasses.replace(ctx, recipe=ctx.recipe.model_copy(update={"stages": stages}))
