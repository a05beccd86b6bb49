"""Parallel SentencePiece encoding for the tokenize stage: documents in, token arrays out, in order.

Worker threads (one per core by default) share one SentencePiece model: SentencePiece releases the
GIL while it encodes, so threads scale like its own num_threads, and nothing is copied to other
processes and back. (Worker processes spent about a third more CPU than the encoding itself on
those copies: on 2 cores the tokenize stage ran at 0.76-0.90 of raw SentencePiece with them and
0.98-1.13 with threads.) Documents go to the threads in chunks of about CHUNK_CHARS characters
and come back as one flat array per chunk, an end-of-document token after each document.
Several streams (the sources of a weighted mixture) may share one Encoder.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

CHUNK_CHARS = 1 << 18  # small enough that the last chunks leave no core idle for long
CHUNK_DOCUMENTS = 4096
T = TypeVar("T")


class Encoder:
    """Encodes streams of (document, payload) into (tokens with end-of-document token, payload)."""

    def __init__(self, model_path: Path, dtype: np.dtype, eos_id: int, num_workers: int = 0):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.dtype = np.dtype(dtype)
        self.eos_id = eos_id
        self.workers = num_workers or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="encode")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def encode(self, items: Iterable[tuple[str, T]], share: float = 1.0) -> Iterator[tuple[Any, T]]:
        """(tokens, payload) per document, in order; `share` of the pool's queue for this stream."""
        for flat, lengths, payloads in self._encode_chunks(chunked(items), share):
            ends = np.cumsum(lengths).tolist()
            starts = [0, *ends[:-1]]
            for start, end, payload in zip(starts, ends, payloads, strict=True):
                yield flat[start:end], payload

    def _encode_chunks(
        self, chunks: Iterable[tuple[list[str], list[T]]], share: float
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[T]]]:
        """(flat tokens, per-document lengths, payloads) per chunk, in order."""
        if self._pool is None:
            for docs, payloads in chunks:
                yield (*self._encode_chunk(docs), payloads)
            return
        # A bounded queue rather than map: map reads the whole input eagerly.
        depth = max(2, math.ceil(2 * self.workers * share))
        pending: deque[tuple[Future, list[T]]] = deque()
        for docs, payloads in chunks:
            pending.append((self._pool.submit(self._encode_chunk, docs), payloads))
            while len(pending) >= depth:
                future, payloads = pending.popleft()
                yield (*future.result(), payloads)
        while pending:
            future, payloads = pending.popleft()
            yield (*future.result(), payloads)

    def _encode_chunk(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The documents' tokens end to end, an end-of-document token after each, and lengths."""
        ids = self.sp.encode(docs, num_threads=1)
        for doc_ids in ids:
            doc_ids.append(self.eos_id)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=total)
        return flat, lengths


def chunked(items: Iterable[tuple[str, T]]) -> Iterator[tuple[list[str], list[T]]]:
    """(documents, payloads) in groups of about CHUNK_CHARS characters (the unit of work)."""
    docs: list[str] = []
    payloads: list[T] = []
    size = 0
    for doc, payload in items:
        docs.append(doc)
        payloads.append(payload)
        size += len(doc)
        if size >= CHUNK_CHARS or len(docs) >= CHUNK_DOCUMENTS:
            yield docs, payloads
            docs, payloads, size = [], [], 0
    if docs:
        yield docs, payloads
