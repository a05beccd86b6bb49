"""Tokens/s of the tokenize stage's parallel encoder vs raw SentencePiece on all cores.

Run: .venv/bin/python bench/tokenize_throughput.py [--corpus-mb 20] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.sources import SourceConfig, iter_documents  # noqa: E402
from data_prep.tokenize import tokenize_corpus  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    """Train a tokenizer on stdlib text, then time both encoders on the same documents."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus-mb", type=float, default=20.0)
    parser.add_argument("--train-mb", type=float, default=5.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    import sentencepiece as spm

    cores = os.cpu_count() or 1
    corpus_bytes = int(args.corpus_mb * 1e6)
    docs = list(iter_documents(SourceConfig(uri="builtin:python-stdlib", max_bytes=corpus_bytes)))
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        start = time.perf_counter()
        train_tokenizer(
            docs_prefix(docs, int(args.train_mb * 1e6)), tok_dir, vocab_size=args.vocab_size
        )
        print(f"trained {args.vocab_size}-vocab BPE in {time.perf_counter() - start:.1f}s")
        model_path = tok_dir / "tokenizer.model"

        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        start = time.perf_counter()
        raw_tokens = sum(map(len, sp.encode(docs, num_threads=cores)))
        raw_seconds = time.perf_counter() - start

        start = time.perf_counter()
        stats = tokenize_corpus(docs, model_path, Path(tmp) / "tokens", num_workers=0)
        ours_seconds = time.perf_counter() - start
    ours_tokens = stats["train_tokens"] + stats["val_tokens"] - stats["documents"]
    assert ours_tokens == raw_tokens, (ours_tokens, raw_tokens)
    raw_rate = raw_tokens / raw_seconds
    ours_rate = ours_tokens / ours_seconds
    print(
        f"corpus: {len(docs)} documents, {num_bytes / 1e6:.1f} MB, {raw_tokens} tokens, {cores} cores"
    )
    print(f"raw sentencepiece encode (num_threads={cores}): {raw_rate:,.0f} tokens/s")
    print(f"tokenize_corpus (workers={cores}, shards written): {ours_rate:,.0f} tokens/s")
    print(f"ratio tokenize/raw: {ours_rate / raw_rate:.2f} (target >= 0.5)")


def docs_prefix(docs: list[str], max_bytes: int) -> list[str]:
    """The leading documents totalling at most max_bytes (the tokenizer's training sample)."""
    out, total = [], 0
    for doc in docs:
        total += len(doc.encode("utf-8"))
        if total > max_bytes:
            break
        out.append(doc)
    return out


if __name__ == "__main__":
    main()
