"""MB/s of the tokenize stage's encoder against raw SentencePiece and HF `tokenizers`, same cores.

The corpus is the running interpreter's standard library: `--docs large` concatenates consecutive
.py files into documents of about 60 kB, `--docs stdlib` keeps one document per file, and
`--docs changelogs` cuts the Debian changelogs under /usr/share/doc (where the machine has them)
into documents of about 60 kB. All three encoders get the same documents and every core; each is
timed `--repeats` times, in turn, and the median is kept with the range of the runs (on a shared
machine the best run says more about the neighbours). The first run of ours is printed too.

Run: .venv/bin/python bench/tokenize_throughput.py [--docs large] [--corpus-mb 24]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Runnable from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.sources import stdlib_documents  # noqa: E402
from data_prep.tokenize import tokenize_corpus  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    """Train a tokenizer on the corpus, then time the three encoders on the same documents."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", choices=["large", "stdlib", "changelogs"], default="large")
    parser.add_argument("--document-kb", type=float, default=60.0)
    parser.add_argument("--corpus-mb", type=float, default=24.0)
    parser.add_argument("--train-mb", type=float, default=3.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="unigram")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokenizer-dir", type=Path, help="reuse (or keep) the trained tokenizer")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    size = int(args.document_kb * 1000) if args.docs != "stdlib" else 0
    texts = changelogs() if args.docs == "changelogs" else stdlib_documents()
    docs = corpus(int(args.corpus_mb * 1e6), size, texts)
    if not docs:
        sys.exit(f"no {args.docs} documents on this machine")
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(
        f"corpus: {len(docs)} documents ({args.docs}, mean {num_bytes / len(docs) / 1e3:.1f} kB), "
        f"{num_bytes / 1e6:.1f} MB, {args.model_type} vocab {args.vocab_size}, {cores} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer_dir or Path(tmp) / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            sample = prefix(docs, int(args.train_mb * 1e6))
            train_tokenizer(sample, tok_dir, model_type=args.model_type, vocab_size=args.vocab_size)
        seconds = timed(encoders(tok_dir, Path(tmp) / "tokens", cores), docs, args.repeats)
    name = "tokenize_corpus (shards written)"
    seconds[f"{name}, first run"] = seconds[name][:1]
    ours = num_bytes / statistics.median(seconds[name]) / 1e6
    for key, times in seconds.items():
        rate, slowest, fastest = (
            num_bytes / t / 1e6 for t in (statistics.median(times), max(times), min(times))
        )
        print(
            f"{key:<44} {rate:7.2f} MB/s (runs {slowest:.1f}-{fastest:.1f})   "
            f"tokenize_corpus / this: {ours / rate:5.2f}"
        )


def encoders(tok_dir: Path, out_dir: Path, cores: int) -> dict[str, Callable[[list[str]], int]]:
    """name -> encode(docs) returning the number of text tokens (no end-of-document tokens)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))

    def ours(docs: list[str]) -> int:
        stats = tokenize_corpus(docs, tok_dir / "tokenizer.model", out_dir, num_workers=0)
        return stats["train_tokens"] + stats["val_tokens"] - stats["documents"]

    def raw(docs: list[str]) -> int:
        return sum(map(len, sp.encode(docs, num_threads=cores)))

    def hf_batch(docs: list[str]) -> int:
        return sum(len(e.ids) for e in hf.encode_batch_fast(docs, add_special_tokens=False))

    return {
        "tokenize_corpus (shards written)": ours,
        f"raw sentencepiece (num_threads={cores})": raw,
        "tokenizers encode_batch (tokenizer.json)": hf_batch,
    }


def timed(
    encoders: dict[str, Callable[[list[str]], int]], docs: list[str], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each of `repeats` runs of every encoder, taking turns; ours and raw
    SentencePiece must give the same tokens, the `tokenizers` count is printed beside them."""
    counts: dict[str, set[int]] = {name: set() for name in encoders}
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            counts[name].add(encode(docs))
            seconds[name].append(time.perf_counter() - start)
    ours, raw, hf = (counts[name] for name in encoders)
    assert len(ours) == 1 and ours == raw, counts
    print(f"tokens: {min(ours)} (tokenizers: {min(hf)})")
    return seconds


def changelogs() -> Iterable[str]:
    """The Debian changelogs of the installed packages, in path order."""
    for path in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        yield gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


def corpus(max_bytes: int, document_bytes: int, texts: Iterable[str]) -> list[str]:
    """The texts (0: one document each), else their lines, joined in order and cut at a line
    end into documents of about `document_bytes`."""
    docs: list[str] = []
    parts: list[str] = []
    size = total = 0
    for text in texts:
        for line in text.splitlines(keepends=True) if document_bytes else [text]:
            parts.append(line)
            size += len(line.encode("utf-8"))
            if size >= document_bytes:
                docs.append("".join(parts))
                total += size
                parts, size = [], 0
                if total >= max_bytes:
                    return docs
    return docs


def prefix(docs: list[str], max_bytes: int) -> list[str]:
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
