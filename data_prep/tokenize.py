"""Stage kind `tokenize`: encode a source with the upstream tokenizer into train/val token shards.

Documents are encoded in parallel worker processes (each loads the SentencePiece model once),
in order, with an end-of-document token after each; a hash of the document index and the seed
decides which split a document belongs to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from data_prep.shards import ShardWriter, token_dtype
from data_prep.sources import SourceStageConfig, mixed_documents
from data_prep.tokenizer import EOS_ID, MODEL_FILE
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json

META_FILE = "meta.json"
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 20
CHUNK_DOCUMENTS = 4096
Progress = Callable[..., Iterator[Any]]


class Config(SourceStageConfig):
    """Tokenize a source (or a mixture) into train/val shards with the upstream tokenizer's model."""

    kind: Literal["tokenize"] = "tokenize"
    val_fraction: float = Field(0.02, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    shard_tokens: int = Field(100_000_000, ge=1)


def run(ctx: StageContext) -> None:
    """Tokenize the source into `ctx.export_dir` (train/, val/, meta.json)."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    model_path = ctx.upstream("tokenizer").export_dir / MODEL_FILE
    if not model_path.is_file():
        raise PipelineError(f"{model_path}: missing; rerun the tokenizer stage")
    stats = tokenize_corpus(
        mixed_documents(cfg.source),
        model_path,
        ctx.export_dir,
        seed=ctx.seed,
        val_fraction=cfg.val_fraction,
        num_workers=cfg.num_workers,
        shard_tokens=cfg.shard_tokens,
        progress=ctx.progress,
    )
    ctx.log.info(
        "%d documents -> %d train + %d val tokens (%.0f tokens/s)",
        stats["documents"],
        stats["train_tokens"],
        stats["val_tokens"],
        stats["tokens_per_second"],
    )
    ctx.write_summary(stats, headline="train_tokens")


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of (seed, index) below val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def tokenize_corpus(
    documents: Iterable[str | tuple[str, int]],
    model_path: Path,
    out_dir: Path,
    seed: int = 0,
    val_fraction: float = 0.02,
    num_workers: int = 0,
    shard_tokens: int = 100_000_000,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode documents (eos after each) into out_dir/{train,val}/ shards plus meta.json.

    A document given as (text, repeat) goes `repeat` times into train (upsampling) and once into
    val; which split it belongs to depends on its index only, so copies never straddle splits.
    With val_fraction > 0 and at least two documents, val gets at least one document: when the
    hash picked none, the last document moves to val.
    """
    import sentencepiece as spm

    start = time.perf_counter()
    vocab_size = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    dtype = token_dtype(vocab_size)
    encoded = encode_chunks(_chunks(documents), model_path, dtype, num_workers)
    if progress is not None:
        encoded = progress(encoded, desc="tokenize")
    num_documents = 0
    with (
        ShardWriter(out_dir / "train", dtype, shard_tokens) as train,
        ShardWriter(out_dir / "val", dtype, shard_tokens) as val,
    ):
        held: tuple[np.ndarray, int] | None = None  # the latest train document, written late
        for flat, lengths, repeats in encoded:
            for tokens, repeat in zip(
                np.split(flat, np.cumsum(lengths)[:-1]), repeats, strict=True
            ):
                if is_val_document(num_documents, seed, val_fraction):
                    val.add(tokens)
                else:
                    if held is not None:
                        _add(train, *held)
                    held = (tokens, repeat)
                num_documents += 1
        if held is not None:
            if val_fraction > 0 and val.num_documents == 0 and num_documents >= 2:
                val.add(held[0])
            else:
                _add(train, *held)
    if num_documents == 0:
        raise PipelineError("tokenize: the source has no documents (empty corpus); add text")
    splits = {
        name: {"num_tokens": writer.num_tokens, "num_documents": writer.num_documents}
        for name, writer in zip(SPLITS, (train, val), strict=True)
    }
    meta = {"vocab_size": vocab_size, "eos_id": EOS_ID, "dtype": dtype.name, "splits": splits}
    atomic_write_json(out_dir / META_FILE, meta)
    elapsed = time.perf_counter() - start
    total_tokens = train.num_tokens + val.num_tokens
    return {
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens,
        "documents": num_documents,
        "tokens_per_second": total_tokens / max(elapsed, 1e-9),
    }


def _add(writer: ShardWriter, tokens: np.ndarray, repeat: int) -> None:
    for _ in range(repeat):
        writer.add(tokens)


def read_meta(export_dir: Path) -> dict[str, Any]:
    """The tokenize stage's meta.json (vocab_size, eos_id, dtype, per-split counts)."""
    return json.loads((Path(export_dir) / META_FILE).read_text(encoding="utf-8"))


def _chunks(documents: Iterable[str | tuple[str, int]]) -> Iterator[tuple[list[str], list[int]]]:
    """(documents, repeats) in groups of about CHUNK_CHARS characters (the unit of work)."""
    chunk: list[str] = []
    repeats: list[int] = []
    size = 0
    for item in documents:
        doc, repeat = (item, 1) if isinstance(item, str) else item
        chunk.append(doc)
        repeats.append(repeat)
        size += len(doc)
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk, repeats
            chunk, repeats, size = [], [], 0
    if chunk:
        yield chunk, repeats


def encode_chunks(
    chunks: Iterable[tuple[list[str], list[int]]],
    model_path: Path,
    dtype: np.dtype,
    num_workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(flat tokens with eos after each document, per-document lengths, repeats) per chunk."""
    import multiprocessing
    import os

    workers = num_workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(str(model_path), dtype.str)
        for docs, repeats in chunks:
            yield (*_encode_chunk(docs), repeats)
        return
    # apply_async with a bounded queue rather than imap: imap reads the whole input eagerly.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _init_worker, (str(model_path), dtype.str)) as pool:
        pending: deque[Any] = deque()
        for docs, repeats in chunks:
            pending.append((pool.apply_async(_encode_chunk, (docs,)), repeats))
            if len(pending) >= 2 * workers:
                result, repeats = pending.popleft()
                yield (*result.get(), repeats)
        while pending:
            result, repeats = pending.popleft()
            yield (*result.get(), repeats)


_worker: dict[str, Any] = {}


def _init_worker(model_path: str, dtype: str) -> None:
    import sentencepiece as spm

    _worker["sp"] = spm.SentencePieceProcessor(model_file=model_path)
    _worker["dtype"] = np.dtype(dtype)


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = _worker["sp"].encode(docs, num_threads=1)
    for doc_ids in ids:
        doc_ids.append(EOS_ID)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_worker["dtype"], count=total)
    return flat, lengths
