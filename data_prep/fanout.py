"""Fan-out for the tokenize stage: split a source into parts, encode each alone, merge byte-identically.

A source's files, taken in order as one run of bytes, are cut into `parts` contiguous pieces of
about equal size. A cut falls between files, or inside a plain .txt file (separator blank_line or
line) right after a document boundary, so each part reads exactly the documents a single reader
would, in the same order. A part writes its documents' tokens (each with its end-of-document
token) to tokens.bin and their lengths to lengths.npy, without deciding train or val. The merge
numbers the documents globally (part k's first document is the number of documents in parts
0..k-1), sends each to train or val by the same hash as a single run, and re-cuts the token streams
into shards of `shard_tokens`: the same shards, indexes and counts as one process writes.
"""

from __future__ import annotations

import array
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_prep.encode import Encoder, Tokenization
from data_prep.shards import ShardWriter
from data_prep.sources import BUILTINS, SourceConfig, _files, _is_hf_dir
from data_prep.text_files import file_documents, file_format, text_documents
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json

PART_FILE = "part.json"
TOKENS_FILE = "tokens.bin"
LENGTHS_FILE = "lengths.npy"
SEARCH_BYTES = 1 << 20
BLOCK_TOKENS = 1 << 24  # the merge copies at most this many tokens at a time
_BOUNDARY = {"blank_line": re.compile(rb"\n\r?\n"), "line": re.compile(rb"\n")}
Piece = tuple[str, int, int | None]  # (file, first byte, end byte or None for the whole file)


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of (seed, index) below val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def parts_problem(parts: int, sources: list[SourceConfig]) -> str | None:
    """Why `parts` processes cannot give the bytes of one over these sources; None when they
    can (one part always can)."""
    if parts <= 1 or not sources:
        return None
    problem = "a mixture of sources" if len(sources) > 1 else fanout_problem(sources[0])
    if problem is None:
        return None
    return (
        f"parts={parts} cannot give the bytes of one process: {problem}; set parts: 1 (or use "
        f"one file source, a file or a glob)"
    )


def fanout_problem(source: SourceConfig) -> str | None:
    """Why this source cannot be split into parts byte-identically; None when it can."""
    if source.uri in BUILTINS:
        return f"built-in source {source.uri} cannot be split"
    if source.max_documents is not None or source.max_bytes is not None:
        return "max_documents/max_bytes count across the whole source"
    if _is_hf_dir(Path(source.uri)):
        return f"HF dataset directory {source.uri} cannot be split"
    return None


def plan_parts(source: SourceConfig, parts: int) -> list[list[Piece]]:
    """The pieces of each part: contiguous, in the source's order, about equal in bytes."""
    files = [str(p) for p in _files(source.uri)]
    sizes = [os.stat(f).st_size for f in files]
    starts = np.cumsum([0, *sizes]).tolist()
    cuts = [(0, 0)]
    for k in range(1, parts):
        target = k * starts[-1] // parts
        f = int(np.searchsorted(starts, target, side="right")) - 1
        cut = (len(files), 0)
        if f < len(files):
            step, offset = _cut_in(source, files[f], target - starts[f])
            cut = (f + step, offset)
        cuts.append(max(cut, cuts[-1]))
    cuts.append((len(files), 0))
    return [_pieces(files, sizes, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def _cut_in(source: SourceConfig, path: str, offset: int) -> tuple[int, int]:
    """(0, byte) of the first document boundary at or after `offset` in the file, else (1, 0)."""
    fmt, compression = file_format(Path(path))
    pattern = _BOUNDARY.get(source.separator)
    if offset == 0:
        return (0, 0)
    if fmt != ".txt" or compression or pattern is None:
        return (1, 0)  # not splittable: the cut goes after the whole file
    with open(path, "rb") as f:
        f.seek(max(offset - 2, 0))
        base, data = f.tell(), b""
        while chunk := f.read(SEARCH_BYTES):
            data += chunk
            found = pattern.search(data)
            if found is not None:
                end = base + found.end()
                return (0, end) if end < os.fstat(f.fileno()).st_size else (1, 0)
            keep = data[-2:]
            base, data = base + len(data) - len(keep), keep
    return (1, 0)


def _pieces(
    files: list[str], sizes: list[int], a: tuple[int, int], b: tuple[int, int]
) -> list[Piece]:
    """The pieces from position a to position b, (file index, byte) each."""
    pieces: list[Piece] = []
    for f in range(a[0], min(b[0], len(files) - 1) + 1):
        if f == b[0] and b[1] == 0:
            break
        start = a[1] if f == a[0] else 0
        end = b[1] if f == b[0] else sizes[f]
        if end <= start and sizes[f]:
            continue
        pieces.append((files[f], start, None if start == 0 and end == sizes[f] else end))
    return pieces


class _Range:
    """A binary file's bytes [start, end) as a readable stream."""

    def __init__(self, f: IO[bytes], start: int, end: int) -> None:
        f.seek(start)
        self.f, self.left = f, end - start

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def part_documents(source: SourceConfig, pieces: list[Piece]) -> Iterator[str]:
    """The non-empty documents of a part's pieces, in order (as iter_documents reads them)."""
    for path, start, end in pieces:
        if end is None:
            documents = file_documents(Path(path), source.text_field, source.separator)
            yield from (doc for doc in documents if doc)
            continue
        with open(path, "rb") as f:
            stream: Any = _Range(f, start, end)
            yield from (doc for doc in text_documents(stream, Path(path), source.separator) if doc)


def part_done(part_dir: Path, key: dict[str, Any]) -> bool:
    """Whether the part was written completely by a run with these arguments."""
    try:
        return json.loads((part_dir / PART_FILE).read_text(encoding="utf-8"))["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def write_part(
    part_dir: Path,
    key: dict[str, Any],
    encoded: Iterator[tuple[Any, Any]],
    dtype: np.dtype,
    started: float,
) -> int:
    """Write a part's encoded documents (tokens.bin, lengths.npy, then part.json); its token count."""
    shutil.rmtree(part_dir, ignore_errors=True)
    part_dir.mkdir(parents=True)
    lengths = array.array("q")
    with open(part_dir / TOKENS_FILE, "wb") as f:
        for tokens, _ in encoded:
            f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())
            lengths.append(len(tokens))
        f.flush()
        os.fsync(f.fileno())
    np.save(part_dir / LENGTHS_FILE, np.asarray(lengths, dtype=np.int64))
    num_tokens = sum(lengths)
    rate = num_tokens / max(time.perf_counter() - started, 1e-9)
    record = {"key": key, "num_documents": len(lengths), "num_tokens": num_tokens}
    atomic_write_json(part_dir / PART_FILE, {**record, "tokens_per_second": rate})
    return num_tokens


def encode_part(
    source: SourceConfig,
    pieces: list[Piece],
    tokenization: Tokenization,
    workers: int,
    part_dir: Path,
    key: dict[str, Any],
) -> None:
    """Encode one part's documents into part_dir (tokens.bin, lengths.npy, part.json)."""
    start = time.perf_counter()
    dtype = tokenization.dtype
    with Encoder(tokenization.backend, dtype, tokenization.eos_id, workers) as encoder:
        documents = ((doc, None) for doc in part_documents(source, pieces))
        write_part(part_dir, key, encoder.encode(documents), dtype, start)


def run_processes(target: Any, jobs: list[tuple[Any, ...]]) -> None:
    """Run target(*job) for each job in its own process, all at once; the first failure raised."""
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    processes = [context.Process(target=_guarded, args=(target, job, errors)) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if not errors.empty():
        raise PipelineError(errors.get())
    if failed:
        raise PipelineError(
            f"tokenize: a part's process died (exit code {failed[0]}); rerun the stage"
        )


def _guarded(target: Any, job: tuple[Any, ...], errors: Any) -> None:
    try:
        target(*job)
    except PipelineError as exc:
        errors.put(str(exc))
        raise SystemExit(1) from None


def merge_parts(
    part_dirs: list[Path],
    key: dict[str, Any],
    out_dir: Path,
    dtype: np.dtype,
    shard_tokens: int,
    seed: int,
    val_fraction: float,
    repeat: int,
) -> dict[str, dict[str, int]]:
    """Write out_dir/{train,val} from the parts, as one process would; per-split counts."""
    lengths = []
    for index, part_dir in enumerate(part_dirs):
        if not part_done(part_dir, {**key, "part": index}):
            raise PipelineError(
                f"tokenize part {index} ({part_dir}): missing or from another run; rerun the stage"
            )
        lengths.append(np.load(part_dir / LENGTHS_FILE))
    masks, first = [], 0
    for part in lengths:
        masks.append(
            np.fromiter(
                (is_val_document(first + j, seed, val_fraction) for j in range(len(part))),
                bool,
                len(part),
            )
        )
        first += len(part)
    if first == 0:
        raise PipelineError("tokenize: the source has no documents (empty corpus); add text")
    if val_fraction > 0 and first >= 2 and not any(mask.any() for mask in masks):
        last = max(k for k, part in enumerate(lengths) if len(part))
        masks[last][-1] = True  # as one process does: the last document moves to val
    with (
        ShardWriter(out_dir / "train", dtype, shard_tokens, sync=False) as train,
        ShardWriter(out_dir / "val", dtype, shard_tokens, sync=False) as val,
    ):
        for part_dir, part, mask in zip(part_dirs, lengths, masks, strict=True):
            if len(part):
                tokens = np.memmap(part_dir / TOKENS_FILE, dtype=dtype, mode="r")
                if int(part.sum()) != len(tokens):
                    raise PipelineError(
                        f"{part_dir / TOKENS_FILE}: not the size {LENGTHS_FILE} says (a part "
                        f"changed after it was written); delete {part_dir} and rerun the stage"
                    )
                _merge_part(tokens, part, mask, train, val, repeat)
    os.sync()  # once for all shards: a merge that dies is simply run again
    return {
        name: {"num_tokens": writer.num_tokens, "num_documents": writer.num_documents}
        for name, writer in (("train", train), ("val", val))
    }


def _merge_part(
    tokens: np.ndarray,
    lengths: np.ndarray,
    is_val: np.ndarray,
    train: ShardWriter,
    val: ShardWriter,
    repeat: int,
) -> None:
    """Copy one part's documents to their splits, BLOCK_TOKENS at a time."""
    ends = np.cumsum(lengths)
    i = 0
    while i < len(lengths):
        start = int(ends[i - 1]) if i else 0
        j = max(i + 1, int(np.searchsorted(ends, start + BLOCK_TOKENS, side="right")))
        block, sizes, held = tokens[start : int(ends[j - 1])], lengths[i:j], is_val[i:j]
        in_val = np.repeat(held, sizes)
        if held.any():
            val.add_documents(block[in_val], sizes[held])
        if repeat == 1:
            train.add_documents(block[~in_val], sizes[~held])
        else:
            offsets = np.cumsum(sizes) - sizes
            for offset, size in zip(offsets[~held].tolist(), sizes[~held].tolist(), strict=True):
                for _ in range(repeat):
                    train.add_documents(block[offset : offset + size], np.array([size]))
        i = j
