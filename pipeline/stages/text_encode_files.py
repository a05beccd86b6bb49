"""Writing a text_encode export: each array whole or not at all, in bounded memory.

The distinct captions are encoded a batch at a time into memory-mapped .npy files (memory holds
one batch whatever the number of captions); every file is written under a partial name and moved
into place once complete, and its sha256 goes into meta.json, which the stage writes last. The
engine marks the stage done only after `run` returns, so a crash never leaves a usable-looking
export.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from data_prep.image_captions import JsonlWriter
from data_prep.text_embeddings_meta import (
    CAPTIONS_FILE,
    EMPTY_PREFIX,
    MASK,
    POOLED,
    STATES,
    ids_file,
)
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import sha256_file
from pipeline.stages.text_encode_models import BagOfWords, Encoded, HFTextEncoder


def write_arrays(
    export: Path,
    encoder: BagOfWords | HFTextEncoder,
    unique: list[str],
    dtype: str,
    batch_size: int,
    where: str,
    progress: Callable[[Iterable[int], int, str], Iterable[int]],
) -> tuple[dict[str, str], np.ndarray, tuple[int, int]]:
    """Encode "" then the distinct captions batch by batch into memory-mapped .npy files;
    returns (file -> sha256, which captions were cut, (dim, pooled_dim)). `progress(items,
    total, desc)` wraps the loop over batches."""
    label = encoder.identity.name
    export.mkdir(parents=True, exist_ok=True)
    empty = encoder.encode([""])
    files = {
        EMPTY_PREFIX + name: save_array(export / (EMPTY_PREFIX + name), array)
        for name, array in stored(empty, dtype, where, label).items()
    }
    count, length = len(unique), empty.states.shape[1]
    dim, pooled_dim = empty.states.shape[2], empty.pooled.shape[1]
    writers = {
        STATES: MemmapWriter(export / STATES, dtype, (count, length, dim)),
        MASK: MemmapWriter(export / MASK, "bool", (count, length)),
        POOLED: MemmapWriter(export / POOLED, dtype, (count, pooled_dim)),
    }
    truncated = np.zeros(count, bool)
    try:
        starts = range(0, count, batch_size)
        for start in progress(starts, len(starts), "encode"):
            batch = encoder.encode(unique[start : start + batch_size])
            for name, array in stored(batch, dtype, where, label).items():
                writers[name].write(start, array)
            truncated[start : start + len(batch.truncated)] = batch.truncated
        files |= {name: writer.close() for name, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.abort()
    return files, truncated, (dim, pooled_dim)


def stored(encoded: Encoded, dtype: str, where: str, label: str) -> dict[str, np.ndarray]:
    """The arrays of an encoded batch as stored: states and pooled in `dtype`, all finite."""
    arrays = {STATES: encoded.states, MASK: encoded.mask, POOLED: encoded.pooled}
    for name in (STATES, POOLED):
        with np.errstate(over="ignore"):  # an overflow is caught below, in one line
            array = arrays[name].astype(dtype)
        if not np.isfinite(array).all():
            if np.isfinite(arrays[name]).all():
                raise PipelineError(
                    f"{where}.dtype: {label}'s outputs exceed float16's range (|x| > 65504); "
                    f"use dtype: float32"
                )
            raise PipelineError(
                f"{where}.encoder: {label} computed NaN or infinite states; check its weights"
            )
        arrays[name] = array
    return arrays


def write_tables(export: Path, unique: list[str], ids: dict[str, np.ndarray]) -> dict[str, str]:
    """captions.jsonl (the distinct captions in row order) and each split's caption ids."""
    writer = JsonlWriter(export / CAPTIONS_FILE)
    try:
        for text in unique:
            writer.append({"text": text})
        files = {CAPTIONS_FILE: writer.close()}
    finally:
        writer.abort()
    return files | {ids_file(s): save_array(export / ids_file(s), rows) for s, rows in ids.items()}


class MemmapWriter:
    """An .npy file filled in row blocks through a memory map of a partial file, moved into
    place on close (memory holds one block whatever the array's size)."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]) -> None:
        self.path, self.partial = path, path.with_name(f".{path.name}.partial")
        self.array: np.memmap | None = np.lib.format.open_memmap(
            self.partial, mode="w+", dtype=np.dtype(dtype), shape=shape
        )

    def write(self, start: int, rows: np.ndarray) -> None:
        assert self.array is not None
        self.array[start : start + len(rows)] = rows

    def close(self) -> str:
        """Flush, move the file into place and return its sha256."""
        assert self.array is not None
        self.array.flush()
        self.array = None  # unmaps the file
        os.replace(self.partial, self.path)
        return sha256_file(self.path)

    def abort(self) -> None:
        """Drop an unfinished file (no-op after close)."""
        if self.array is not None:
            self.array = None
            self.partial.unlink(missing_ok=True)


def save_array(path: Path, array: np.ndarray) -> str:
    """np.save into a partial file moved into place; returns the file's sha256."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as file:
        np.save(file, np.ascontiguousarray(array))
    os.replace(partial, path)
    return sha256_file(path)
