"""The curate stage's reader: the documents of its sources in the order tokenize reads them, each
with its provenance (source, file, row).

The documents, their order and the max_documents/max_bytes cut are those of
data_prep.sources.iter_documents and tagged_documents (a test holds them equal); what this adds
is where each document came from: its file (or built-in) and its row, the document's index among
the documents (records, rows) that file yields.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from data_prep.sources import (
    ARITHMETIC,
    STDLIB,
    TASK,
    SourceConfig,
    _files,
    _hf_documents,
    _is_hf_dir,
    limited,
    stdlib_documents,
)
from data_prep.tasks import task_documents
from data_prep.text_files import file_documents
from pipeline.engine.errors import PipelineError


class Document(NamedTuple):
    """One document and where it came from."""

    text: str
    source: int  # index of its source in the stage's list
    file: str
    row: int


def source_documents(sources: list[SourceConfig]) -> Iterator[Document]:
    """Every document of the sources, round-robin one document at a time (as tagged_documents)."""
    streams = [(i, _limited(source, i)) for i, source in enumerate(sources)]
    while streams:
        alive = []
        for index, documents in streams:
            doc = next(documents, None)
            if doc is not None:
                yield doc
                alive.append((index, documents))
        streams = alive


def _limited(source: SourceConfig, index: int) -> Iterator[Document]:
    """Non-empty documents up to max_documents / max_bytes, the last one cut at a character."""
    pairs = ((text, (file, row)) for text, file, row in _origins(source))
    found = False
    for text, (file, row) in limited(pairs, source):
        found = True
        yield Document(text, index, file, row)
    if not found:
        raise PipelineError(f"source {source.uri}: no documents (empty corpus); point it at text")


def _origins(source: SourceConfig) -> Iterator[tuple[str, str, int]]:
    """(text, file, row) of every non-empty raw document of a source."""
    if source.uri == STDLIB:
        yield from _numbered(stdlib_documents(), source.uri)
    elif source.uri in (TASK, ARITHMETIC):
        yield from _numbered(task_documents(source.task_config(), source.problems), source.uri)
    elif _is_hf_dir(Path(source.uri)):
        yield from _numbered(_hf_documents(Path(source.uri), source.text_field), source.uri)
    else:
        for path in _files(source.uri):
            documents = file_documents(path, source.text_field, source.separator)
            yield from _numbered(documents, str(path))


def _numbered(texts: Iterator[str], file: str) -> Iterator[tuple[str, str, int]]:
    """Each non-empty text with its index among every text the reader yields (a record's row)."""
    for row, text in enumerate(texts):
        if text:
            yield text, file, row
