"""Parallel encoding for the tokenize stage: documents in, token arrays out, in order.

Two encoding backends sit behind one Encoder: the tokenizer stage's SentencePiece model, and a
user directory's Hugging Face fast tokenizer (its Rust `tokenizers` backend, run exactly as
`tokenizer(docs, add_special_tokens=False)` runs it). Worker threads (one per core by default)
share one backend: both release the GIL while they encode, so threads scale like the libraries'
own threading, and nothing is copied to other processes and back. (Worker processes spent about
a third more CPU than the encoding itself on those copies: on 2 cores the tokenize stage ran at
0.76-0.90 of raw SentencePiece with them and 0.98-1.13 with threads.) Documents go to the
threads in chunks of about CHUNK_CHARS characters and come back as one flat array per chunk, an
end-of-document token after each document. Several streams (the sources of a weighted mixture)
may share one Encoder.

Documents are separated by the tokenizer's end-of-text token: SentencePiece's `</s>`; for a
Hugging Face tokenizer an added token spelled `<|endoftext|>` or `<|end_of_text|>` when it has
one (what GPT-2, Qwen and Llama 3 separated their pretraining documents with, while a chat
model's eos_token, e.g. Qwen's `<|im_end|>`, ends a turn), else its eos_token.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np

from data_prep.shards import token_dtype
from data_prep.tokenizer_meta import STAGE_IDS
from data_prep.tokens_meta import TokensMeta, load_tokenizer, tokenizer_vocab_size, vocab_identity
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import sha256_file

CHUNK_CHARS = 1 << 18  # small enough that the last chunks leave no core idle for long
CHUNK_DOCUMENTS = 4096
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
T = TypeVar("T")


class Backend(Protocol):
    """Encodes a batch of documents to token ids (no special tokens added); thread-safe."""

    def encode_batch(self, docs: list[str]) -> list[list[int]]: ...


class SentencePieceBackend:
    """The tokenizer stage's SentencePiece model."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def encode_batch(self, docs: list[str]) -> list[list[int]]:
        return self.sp.encode(docs, num_threads=1)

    def __reduce__(self) -> tuple[Any, ...]:  # to part processes: by file, reloaded there
        return (SentencePieceBackend, (self.model_file,))


class TokenizersBackend:
    """A Hugging Face fast tokenizer's Rust backend (encode_batch_fast: no offsets computed)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer

    def encode_batch(self, docs: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch_fast(docs, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def __reduce__(self) -> tuple[Any, ...]:  # to part processes without importing transformers
        return (
            _tokenizers_backend,
            (self.tokenizer.to_str(), self.tokenizer.encode_special_tokens),
        )


def _tokenizers_backend(serialized: str, encode_special_tokens: bool) -> TokenizersBackend:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(serialized)
    tokenizer.encode_special_tokens = encode_special_tokens  # not part of the JSON
    return TokenizersBackend(tokenizer)


@dataclass(frozen=True)
class Tokenization:
    """What a tokenize run encodes with, and what its meta.json records of it."""

    backend: Backend
    vocab_size: int
    eos_id: int
    signature: str  # a hash of what encodes (the SentencePiece model, the backend's JSON)
    tokenizer_id: str | None
    tokenizer_path: str | None  # a user's directory; None for the tokenizer stage's model

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def meta(self, splits: dict[str, Any], mixture: dict[str, Any] | None = None) -> TokensMeta:
        """The export's meta.json record for shards encoded with this tokenization."""
        return TokensMeta.model_validate(
            {
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "dtype": self.dtype.name,
                "splits": splits,
                "mixture": mixture,
                "tokenizer_id": self.tokenizer_id,
                "tokenizer_path": self.tokenizer_path,
            }
        )


def open_tokenization(path: Path) -> Tokenization:
    """A SentencePiece model file (the tokenizer stage's), or a Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        return _hf_tokenization(path)
    backend = SentencePieceBackend(path)
    vocab_size = backend.sp.get_piece_size()
    has_hf = any((path.parent / name).is_file() for name in HF_TOKENIZER_FILES)
    # The identity is that of the HF export beside the model, as a consumer loads it.
    identity = vocab_identity(load_tokenizer(path.parent), vocab_size) if has_hf else None
    return Tokenization(backend, vocab_size, STAGE_IDS["eos_id"], sha256_file(path), identity, None)


def _hf_tokenization(path: Path) -> Tokenization:
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError(
            f"{path}: its tokenizer ({type(tokenizer).__name__}) is a slow Python tokenizer; "
            f"tokenize needs a fast one: add its tokenizer.json (save_pretrained of the fast class)"
        )
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # as tokenizer(docs) without truncation= or padding= runs it
    backend.no_padding()
    eos_id = end_of_text_id(tokenizer)
    if eos_id is None:
        raise PipelineError(
            f"{path}: its tokenizer has no end-of-text token (<|endoftext|>) and no eos_token to "
            f"separate documents with; set eos_token in its tokenizer_config.json"
        )
    vocab_size = tokenizer_vocab_size(tokenizer)
    serialized = backend.to_str() + f"\nencode_special_tokens={backend.encode_special_tokens}"
    signature = hashlib.sha256(serialized.encode("utf-8")).hexdigest()
    identity = vocab_identity(tokenizer, vocab_size)
    return Tokenization(
        TokenizersBackend(backend), vocab_size, eos_id, signature, identity, str(path)
    )


def end_of_text_id(tokenizer: Any) -> int | None:
    """The document separator of a HF tokenizer (see the module docstring), None without one."""
    added = tokenizer.get_added_vocab()
    for token in END_OF_TEXT:
        if token in added:
            return added[token]
    return tokenizer.eos_token_id


class Encoder:
    """Encodes streams of (document, payload) into (tokens with end-of-document token, payload)."""

    def __init__(self, backend: Backend, dtype: np.dtype, eos_id: int, num_workers: int = 0):
        self.backend = backend
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
        ids = self.backend.encode_batch(docs)
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
