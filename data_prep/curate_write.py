"""The curate stage's output: kept documents per source and removed documents per step, as
compressed JSONL shards, each document with its id and provenance, and the DocumentsMeta record.

One process writes every shard, reading the sources once more in their order, so the bytes do
not depend on how many parts analysed them. Compression is deterministic (zstd at a fixed level
without threads; gzip without a name or time in its header), so the same documents give the same
files. A shard is written to a temp file and renamed when complete.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import zstandard

from data_prep.curate_decide import Decisions
from data_prep.curate_read import source_documents
from data_prep.curate_steps import strip_boilerplate
from data_prep.documents_meta import (
    KEPT_DIR,
    REMOVED_DIR,
    SUFFIXES,
    Counts,
    DocumentsMeta,
    SourceRecord,
    StepRecord,
)
from pipeline.engine.errors import PipelineError

ZSTD_LEVEL = 3
EXAMPLES = 5


class JsonlShards:
    """Appends records to folder/shard_NNNNN.jsonl.zst (or .gz), a new shard every shard_bytes of
    uncompressed JSON."""

    def __init__(
        self,
        folder: Path,
        compression: str,
        shard_bytes: int,
        committed: Callable[[], None] | None = None,
    ) -> None:
        self.folder, self.compression, self.shard_bytes = folder, compression, shard_bytes
        self.committed = committed
        self.shards: list[str] = []
        self.stream: IO[bytes] | None = None
        self.raw: IO[bytes] | None = None
        self.size = 0

    def add(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self.stream is None:
            self._open()
        assert self.stream is not None
        self.stream.write(line)
        self.size += len(line)
        if self.size >= self.shard_bytes:
            self.close()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.raw = open(self._path(".tmp"), "wb")  # noqa: SIM115 (closed when the shard is)
        if self.compression == "zstd":
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            self.stream = compressor.stream_writer(self.raw, closefd=False)
        else:
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="wb", filename="", mtime=0)
        self.size = 0

    def _path(self, tmp: str = "") -> Path:
        name = f"shard_{len(self.shards):05d}{SUFFIXES[self.compression]}"
        return self.folder / (f".{name}{tmp}" if tmp else name)

    def close(self) -> None:
        """Commit the open shard, if any."""
        if self.stream is None or self.raw is None:
            return
        self.stream.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self._path(".tmp"), self._path())
        self.shards.append(self._path().name)
        self.stream = self.raw = None
        if self.committed is not None:
            self.committed()


def write_documents(
    config: Any,
    names: list[str],
    decisions: Decisions,
    out_dir: Path,
    committed: Callable[[], None] | None = None,
) -> DocumentsMeta:
    """Write every document to kept/<source>/ or removed/<step>/ under out_dir; its record."""
    steps = list(config.steps)
    lines_at = steps.index("lines") + 1 if "lines" in steps else 0
    boilerplate = set(decisions.boilerplate.tolist())

    def shards(folder: Path) -> JsonlShards:
        return JsonlShards(folder, config.compression, config.shard_bytes, committed)

    kept = [shards(out_dir / KEPT_DIR / name) for name in names]
    removed = {step: shards(out_dir / REMOVED_DIR / step) for step in steps}
    read = {name: Counts() for name in names}
    kept_counts = {name: Counts() for name in names}
    steps_out = {
        step: StepRecord(step=step, removed={n: Counts() for n in names}) for step in steps
    }
    if lines_at:
        steps_out["lines"].lines_cut = {name: Counts() for name in names}
    total = len(decisions.fate)
    index = -1
    for index, doc in enumerate(source_documents(config.source)):
        if index >= total:
            raise _changed(index + 1, total)
        name, text = names[doc.source], doc.text
        _count(read[name], text)
        fate = int(decisions.fate[index])
        if lines_at and (fate == 0 or fate > lines_at):
            stripped = strip_boilerplate(text, boilerplate, config.lines.min_chars)
            cut = steps_out["lines"].lines_cut[name]
            cut.documents += len(text.splitlines()) - len(stripped.splitlines())
            cut.bytes += len(text.encode("utf-8")) - len(stripped.encode("utf-8"))
            if fate == 0 and lines_at == len(steps) and not stripped.strip():
                fate = decisions.fate[index] = lines_at  # the last step left it empty
            else:
                text = stripped
        record = {"id": index, "text": text, "source": name, "file": doc.file, "row": doc.row}
        if fate == 0:
            kept[doc.source].add(record)
            _count(kept_counts[name], text)
            continue
        step = steps[fate - 1]
        reason = decisions.reason(index)
        out = {**record, "step": step, "reason": reason, **decisions.fields(index)}
        removed[step].add(out)
        _count(steps_out[step].removed[name], text)
        if len(steps_out[step].examples) < EXAMPLES:
            steps_out[step].examples.append(f"document {index} ({name}): {reason}")
    if index + 1 != total:
        raise _changed(index + 1, total)
    for writer in [*kept, *removed.values()]:
        writer.close()
    return DocumentsMeta(
        compression=config.compression,
        steps=[steps_out[step] for step in steps],
        sources=[
            _source_record(source, name, read[name], kept_counts[name], writer.shards)
            for name, source, writer in zip(names, config.source, kept, strict=True)
        ],
        removed_shards={
            step: [f"{REMOVED_DIR}/{step}/{shard}" for shard in writer.shards]
            for step, writer in removed.items()
        },
        cluster_sizes=dict(sorted(decisions.cluster_sizes.items())),
    )


def _source_record(
    source: Any, name: str, read: Counts, kept: Counts, shards: list[str]
) -> SourceRecord:
    return SourceRecord(
        name=name,
        uri=source.uri,
        weight=source.weight,
        repeat=source.repeat,
        on_exhausted=source.on_exhausted,
        read=read,
        kept=kept,
        shards=[f"{KEPT_DIR}/{name}/{shard}" for shard in shards],
    )


def _changed(found: int, analysed: int) -> PipelineError:
    now = f"more than {analysed}" if found > analysed else str(found)
    return PipelineError(
        f"curate: the sources now give {now} documents, not the {analysed} analysed (they "
        f"changed during the stage); rerun the stage"
    )


def _count(counts: Counts, text: str) -> None:
    counts.documents += 1
    counts.bytes += len(text.encode("utf-8"))
