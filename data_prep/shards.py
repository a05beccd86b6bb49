"""Token shards: flat uint16/uint32 binaries with a JSON index, read as one memory-mapped stream.

Batches are a pure function of (seed, step, rank, world size, micro batch, micro step): resume
is exact without loader state, and the samples of a step depend only on the global batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, sha256_file

SHARD_PREFIX = "shard_"
COUNT_CHUNK_TOKENS = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


class ShardWriter:
    """Appends documents' tokens to `split_dir`, starting a new shard every `shard_tokens`.

    A shard is committed whole (temp file, fsync, rename, then its index). With `resumable`, the
    open shard's temp file survives an error, `state()` records how far the writer got, and a new
    writer given that state continues exactly where it was (see `ShardWriter.resume`).
    """

    def __init__(
        self,
        split_dir: Path,
        dtype: np.dtype | str,
        shard_tokens: int,
        resumable: bool = False,
        sync: bool = True,
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.split_dir = Path(split_dir)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.resumable = resumable
        self.sync = sync  # False: no fsync per shard (the caller syncs once at the end)
        self.num_tokens = 0
        self.num_documents = 0
        self.num_shards = 0
        self._file: Any = None
        self._hash: Any = None
        self._shard_tokens_written = 0
        self._shard_documents = 0
        self.split_dir.mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray, num_documents: int = 1) -> None:
        """Append tokens; the documents count toward the shard that holds their last token."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(data):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._shard_tokens_written
            part, data = data[:room], data[room:]
            raw = part.tobytes()
            self._file.write(raw)
            self._hash.update(raw)
            self._shard_tokens_written += len(part)
            self.num_tokens += len(part)
            if not len(data):
                self._shard_documents += num_documents
            if self._shard_tokens_written == self.shard_tokens:
                self._finish()
        self.num_documents += num_documents

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once (their tokens back to back); same bytes as add() each."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        ends = np.cumsum(lengths)
        if len(ends) and int(ends[-1]) != len(data):
            raise ValueError(f"lengths sum to {int(ends[-1])}, tokens has {len(data)}")
        pos = 0
        while pos < len(data):
            if self._file is None:
                self._open()
            part = data[pos : pos + self.shard_tokens - self._shard_tokens_written]
            raw = part.tobytes()
            self._file.write(raw)
            self._hash.update(raw)
            # a document counts toward the shard that holds its last token
            done = np.searchsorted(ends, [pos, pos + len(part)], side="right")
            self._shard_documents += int(done[1] - done[0])
            self._shard_tokens_written += len(part)
            self.num_tokens += len(part)
            pos += len(part)
            if self._shard_tokens_written == self.shard_tokens:
                self._finish()
        self.num_documents += len(lengths)

    def close(self) -> None:
        """Finish the last shard (atomically: temp file, fsync, rename, then its index)."""
        if self._file is not None:
            self._finish()

    def state(self) -> dict[str, int]:
        """How far the writer got, with the open shard's tokens on disk (flushed and fsynced)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {
            "num_shards": self.num_shards,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "open_tokens": self._shard_tokens_written if self._file is not None else 0,
            "open_documents": self._shard_documents if self._file is not None else 0,
        }

    def resume(self, state: dict[str, int]) -> None:
        """Continue from `state` (of a writer of the same split, dtype and shard size).

        Shards committed after the state was taken are removed; the open shard's tokens are taken
        from its temp file, or from the committed shard it became. ValueError when the files on
        disk cannot give back that state.
        """
        first = state["num_shards"]
        for index in range(first):
            meta = self.split_dir / f"{shard_name(index)}.json"
            data = meta.with_suffix(".bin")
            size = json.loads(meta.read_text())["num_tokens"] if meta.is_file() else -1
            if not data.is_file() or data.stat().st_size != size * self.dtype.itemsize:
                raise ValueError(f"{data}: missing or not the size its index says")
        self.num_shards, self.num_tokens = first, state["num_tokens"]
        self.num_documents = state["num_documents"]
        open_bytes = state["open_tokens"] * self.dtype.itemsize
        committed = self.split_dir / f"{shard_name(first)}.bin"
        if not self._tmp_path().is_file() and committed.is_file():
            os.replace(committed, self._tmp_path())
        for path in self.split_dir.iterdir():  # later shards, stale temp files
            if path != self._tmp_path() and (path.name[0] == "." or _shard_index(path) >= first):
                path.unlink()
        if not open_bytes:
            self._tmp_path().unlink(missing_ok=True)
            return
        if not self._tmp_path().is_file() or self._tmp_path().stat().st_size < open_bytes:
            raise ValueError(f"{self._tmp_path()}: shorter than {open_bytes} bytes")
        self._file = open(self._tmp_path(), "r+b")  # noqa: SIM115 (closed in _finish)
        self._file.truncate(open_bytes)
        self._hash = hashlib.sha256()
        while chunk := self._file.read(1 << 20):
            self._hash.update(chunk)
        self._shard_tokens_written = state["open_tokens"]
        self._shard_documents = state["open_documents"]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            if not self.resumable:
                self._tmp_path().unlink(missing_ok=True)

    def _tmp_path(self) -> Path:
        return self.split_dir / f".{shard_name(self.num_shards)}.bin.tmp"

    def _open(self) -> None:
        self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 (closed in _finish)
        self._hash = hashlib.sha256()
        self._shard_tokens_written = 0
        self._shard_documents = 0

    def _finish(self) -> None:
        self._file.flush()
        if self.sync:
            os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.num_shards)
        os.replace(self._tmp_path(), self.split_dir / f"{name}.bin")
        index = {
            "dtype": self.dtype.name,
            "num_tokens": self._shard_tokens_written,
            "num_documents": self._shard_documents,
            "sha256": self._hash.hexdigest(),
        }
        if self.sync:
            atomic_write_json(self.split_dir / f"{name}.json", index)
        else:  # the same bytes as atomic_write_json, without its fsync
            tmp = self.split_dir / f".{name}.json.tmp"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            os.replace(tmp, self.split_dir / f"{name}.json")
        self._file = None
        self.num_shards += 1


def _shard_index(path: Path) -> int:
    """The shard number in a shard's file name (data, index or temp file); -1 for other files."""
    stem = path.name.removeprefix(".").split(".")[0]
    number = stem.removeprefix(SHARD_PREFIX)
    return int(number) if stem.startswith(SHARD_PREFIX) and number.isdigit() else -1


class SampleOrder:
    """Which items a rank's micro batch takes: a pure function of (seed, step, rank, ...).

    Sample j of a step (j < world_size * micro_batch_size * accum_steps) is global sample
    step * global_batch + j, drawn from its epoch's seeded permutation of the items; a micro
    batch takes a contiguous block of j, so the union over ranks and micro steps is the same
    whenever the global batch is. Shared by token and image shards.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def rows(
        self,
        seed: int,
        step: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        num_items: int,
        micro_step: int = 0,
        accum_steps: int = 1,
    ) -> np.ndarray:
        """Item indices (int64) of one rank's micro batch."""
        if not (0 <= rank < world_size and 0 <= micro_step < accum_steps and micro_batch_size > 0):
            raise ValueError(
                f"need 0 <= rank < world_size, 0 <= micro_step < accum_steps, micro_batch_size > 0; "
                f"got rank={rank} world_size={world_size} micro_step={micro_step} "
                f"accum_steps={accum_steps} micro_batch_size={micro_batch_size}"
            )
        global_batch = world_size * micro_batch_size * accum_steps
        first = step * global_batch + (micro_step * world_size + rank) * micro_batch_size
        rows = np.empty(micro_batch_size, dtype=np.int64)
        for i, g in enumerate(range(first, first + micro_batch_size)):
            epoch, position = divmod(g, num_items)
            rows[i] = self._permutation(seed, epoch, num_items)[position]
        return rows

    def _permutation(self, seed: int, epoch: int, num_items: int) -> np.ndarray:
        """The epoch's item order; the two most recent epochs are cached."""
        key = (seed, epoch, num_items)
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = np.random.default_rng([seed, epoch]).permutation(num_items)
        return self._cache[key]


class TokenShards:
    """All shards of a split as one read-only virtual token stream."""

    def __init__(self, split_dir: Path) -> None:
        self.split_dir = Path(split_dir)
        if not self.split_dir.is_dir():
            raise PipelineError(f"{self.split_dir}: no such token split; run the tokenize stage")
        self.index: list[dict[str, Any]] = []
        self._maps: list[np.ndarray] = []
        for path in sorted(self.split_dir.glob(f"{SHARD_PREFIX}*.json")):
            meta = json.loads(path.read_text(encoding="utf-8"))
            bin_path = path.with_suffix(".bin")
            dtype = np.dtype(meta["dtype"])
            expected = meta["num_tokens"] * dtype.itemsize
            actual = bin_path.stat().st_size if bin_path.is_file() else None
            if actual != expected:
                raise PipelineError(
                    f"{bin_path}: {'missing' if actual is None else f'{actual} bytes'}, index says "
                    f"{expected}; the shard is truncated or modified, rerun the tokenize stage"
                )
            self.index.append({**meta, "path": bin_path})
            self._maps.append(np.memmap(bin_path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [m["num_tokens"] for m in self.index])
        self.num_tokens = int(self._starts[-1])
        self.num_documents = sum(m["num_documents"] for m in self.index)
        self._order = SampleOrder()

    def verify(self) -> None:
        """Recompute every shard's checksum; PipelineError naming the first shard that differs."""
        for meta in self.index:
            if sha256_file(meta["path"]) != meta["sha256"]:
                raise PipelineError(
                    f"{meta['path']}: checksum mismatch, the shard was modified or corrupted; "
                    f"rerun the tokenize stage"
                )

    def tokens(self, start: int, end: int) -> np.ndarray:
        """tokens[start:end] of the virtual stream as int64, crossing shard boundaries."""
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(first, len(self._maps)):
            lo = max(start - self._starts[i], 0)
            hi = min(end - self._starts[i], len(self._maps[i]))
            if hi <= 0:
                break
            parts.append(self._maps[i][lo:hi])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of seq_len + 1 tokens (consecutive windows share one token)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if self.num_tokens == 0:
            raise PipelineError(
                f"{self.split_dir}: no documents in this split; the tokenize stage's source has "
                f"too few documents to give both train and val one (it splits by document at "
                f"val_fraction); give it more documents (a .txt source: separator blank_line or "
                f"line) or more files"
            )
        if self.num_tokens < seq_len + 1:
            raise PipelineError(
                f"{self.split_dir}: has {self.num_tokens} tokens, needs at least seq_len+1 = "
                f"{seq_len + 1}; use more data or a shorter seq_len"
            )
        return (self.num_tokens - 1) // seq_len

    def window(self, i: int, seq_len: int) -> np.ndarray:
        return self.tokens(i * seq_len, i * seq_len + seq_len + 1)

    def batch(
        self,
        seed: int,
        step: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seq_len: int,
        micro_step: int = 0,
        accum_steps: int = 1,
    ) -> np.ndarray:
        """[micro_batch_size, seq_len + 1] int64 tokens of one rank's micro step; pure function.

        Sample j of a step (j < world_size * micro_batch_size * accum_steps) is global sample
        step * global_batch + j; a micro batch takes a contiguous block of j, so the union over
        ranks and micro steps is the same whenever the global batch is.
        """
        rows = self._order.rows(
            seed, step, rank, world_size, micro_batch_size, self.num_windows(seq_len),
            micro_step, accum_steps,
        )  # fmt: skip
        return np.stack([self.window(int(i), seq_len) for i in rows])

    def windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[np.ndarray]:
        """Sequential non-overlapping windows of seq_len + 1 tokens (int64), for evaluation."""
        count = self.num_windows(seq_len)
        if max_windows is not None:
            count = min(count, max_windows)
        for i in range(count):
            yield self.window(i, seq_len)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the split (length vocab_size, int64)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for data in self._maps:
            for start in range(0, len(data), COUNT_CHUNK_TOKENS):
                chunk = data[start : start + COUNT_CHUNK_TOKENS]
                found = np.bincount(chunk, minlength=vocab_size)
                if len(found) > vocab_size:
                    raise PipelineError(
                        f"{self.split_dir}: token id {len(found) - 1} >= vocab_size {vocab_size}; "
                        f"pass the tokenizer's vocab_size"
                    )
                counts += found
        return counts
