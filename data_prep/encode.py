"""Parallel SentencePiece encoding for the tokenize stage: documents in, token arrays out, in order.

Worker processes (one per core by default) each load the model once. Documents travel to them in
chunks of about CHUNK_CHARS characters and come back as one flat array per chunk, an
end-of-document token after each document. Workers fork from a forkserver that imported this
module (numpy and the standard library only), so a worker starts in milliseconds instead of
starting an interpreter and importing the project; spawn is the fallback where there is no
forkserver. Until the first worker answers, this process encodes chunks itself rather than wait.
Several streams (the sources of a weighted mixture) may share one Encoder.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

CHUNK_CHARS = 1 << 18  # small enough that the last chunks leave no core idle for long
CHUNK_DOCUMENTS = 4096
COLD_CHUNKS = 64  # chunks this process may encode ahead while the workers start
T = TypeVar("T")


class Encoder:
    """Encodes streams of (document, payload) into (tokens with end-of-document token, payload)."""

    def __init__(self, model_path: Path, dtype: np.dtype, eos_id: int, num_workers: int = 0):
        self.args = (str(model_path), np.dtype(dtype).str, eos_id)
        self.workers = num_workers or os.cpu_count() or 1
        self._pool: Any = None
        self._warm = False  # whether a worker has answered yet

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self._pool = _context().Pool(self.workers, _init_worker, self.args)
        _init_worker(*self.args)  # this process encodes too while the workers start
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
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
                yield (*_encode_chunk(docs), payloads)
            return
        # apply_async with a bounded queue rather than imap: imap reads the whole input eagerly.
        depth = max(2, math.ceil(2 * self.workers * share))
        pending: deque[tuple[Any, list[T]]] = deque()
        for docs, payloads in chunks:
            if not self._warm and len(pending) >= depth // 2:  # the workers have enough queued
                pending.append((_Done(_encode_chunk(docs)), payloads))
                self._warm = any(result.ready() for result, _ in pending)
            else:
                pending.append((self._pool.apply_async(_encode_chunk, (docs,)), payloads))
            while len(pending) >= (depth if self._warm else depth + COLD_CHUNKS):
                result, payloads = pending.popleft()
                yield (*result.get(), payloads)
        while pending:
            result, payloads = pending.popleft()
            yield (*result.get(), payloads)


class _Done:
    """A chunk encoded in this process, with the AsyncResult methods the queue uses."""

    def __init__(self, value: tuple[np.ndarray, np.ndarray]) -> None:
        self.value = value

    def ready(self) -> bool:
        return False  # not a worker's answer: says nothing about the workers being up

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        return self.value


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


def _context() -> Any:
    """A forkserver context that preloads this module (spawn where there is none)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


_worker: dict[str, Any] = {}


def _init_worker(model_path: str, dtype: str, eos_id: int) -> None:
    import sentencepiece as spm

    _worker["sp"] = spm.SentencePieceProcessor(model_file=model_path)
    _worker["dtype"] = np.dtype(dtype)
    _worker["eos_id"] = eos_id


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = _worker["sp"].encode(docs, num_threads=1)
    eos_id = _worker["eos_id"]
    for doc_ids in ids:
        doc_ids.append(eos_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_worker["dtype"], count=total)
    return flat, lengths
