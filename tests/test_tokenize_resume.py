"""Resumable tokenization: a tokenize run stopped midway continues after its last committed shard
and ends with the same bytes (every shard, every index, meta.json) as an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from data_prep.sources import SourceConfig, iter_documents, stdlib_documents
from data_prep.tokenize import PROGRESS_FILE, tokenize_corpus
from data_prep.tokenizer import train_tokenizer
from tests.helpers import kill_then_resume

NUM_DOCUMENTS = 12_000
STOP_AT = 9_000
SETTINGS: dict[str, Any] = {"seed": 5, "val_fraction": 0.1, "num_workers": 1, "shard_tokens": 3001}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    source = SourceConfig(uri="builtin:python-stdlib", max_bytes=200_000)
    train_tokenizer(iter_documents(source), out, vocab_size=400)
    return out / "tokenizer.model"


def corpus() -> list[tuple[str, int]]:
    """Documents of varied length; every fifth is upsampled, so copies also span shards."""
    return [
        (f"document {i}:\n" + "    text and more text\n" * (i % 7), 2 if i % 5 == 0 else 1)
        for i in range(NUM_DOCUMENTS)
    ]


def stopping(documents: list[tuple[str, int]], at: int) -> Iterator[tuple[str, int]]:
    """The documents, then a Ctrl-C when the reader asks for document `at`."""
    yield from documents[:at]
    raise KeyboardInterrupt


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def counting(seen: list[int]) -> Any:
    """A progress wrapper that counts the documents the encoder actually encoded."""

    def wrap(encoded: Iterator[Any], desc: str) -> Iterator[Any]:
        for tokens, repeat, source in encoded:
            seen.append(1)
            yield tokens, repeat, source

    return wrap


def test_tokenize_resumes_after_last_committed_shard_byte_identical(
    tmp_path: Path, model_path: Path
) -> None:
    reference = tmp_path / "reference"
    tokenize_corpus(corpus(), model_path, reference, **SETTINGS)
    state, out = tmp_path / "state", tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(stopping(corpus(), STOP_AT), model_path, out, resume_dir=state, **SETTINGS)
    progress = json.loads((state / PROGRESS_FILE).read_text())
    assert 0 < progress["next_document"] <= STOP_AT and not out.exists()
    assert progress["splits"]["train"]["num_shards"] >= 10
    assert any(state.glob("train/.shard_*.bin.tmp"))  # the open shard survived the interrupt

    encoded: list[int] = []
    stats = tokenize_corpus(
        corpus(), model_path, out, resume_dir=state, progress=counting(encoded), **SETTINGS
    )
    assert stats["resumed_documents"] == progress["next_document"]
    assert sum(encoded) == NUM_DOCUMENTS - stats["resumed_documents"]  # skipped, not re-encoded
    assert files(out) == files(reference) and len(files(out)) > 20
    assert not state.exists()


@pytest.mark.parametrize("change", ["fingerprint", "val_fraction", "shard_tokens"])
def test_tokenize_does_not_resume_with_changed_arguments(
    tmp_path: Path, model_path: Path, change: str
) -> None:
    state, out = tmp_path / "state", tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(stopping(corpus(), STOP_AT), model_path, out, resume_dir=state, **SETTINGS)
    assert (state / PROGRESS_FILE).is_file()
    changed = {**SETTINGS, "fingerprint": "before"}
    changed[change] = {"fingerprint": "after", "val_fraction": 0.2, "shard_tokens": 4000}[change]
    stats = tokenize_corpus(corpus(), model_path, out, resume_dir=state, **changed)
    assert stats["resumed_documents"] == 0
    del changed["fingerprint"]
    tokenize_corpus(corpus(), model_path, tmp_path / "fresh", **changed)
    assert files(out) == files(tmp_path / "fresh")


def write_corpus(path: Path, max_bytes: int) -> None:
    """Blank-line separated paragraphs of stdlib source, about `max_bytes` of them."""
    size = 0
    with path.open("w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            f.write(doc + "\n\n")
            size += len(doc)
            if size >= max_bytes:
                return


@pytest.mark.e2e
def test_tokenize_kill_9_then_rerun_gives_identical_shards(tmp_path: Path) -> None:
    corpus_path = tmp_path / "corpus.txt"
    write_corpus(corpus_path, 2_500_000)
    source = {"uri": str(corpus_path)}
    recipe = {
        "name": "resume",
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "tokenizer": {
                "kind": "tokenizer",
                "source": source,
                "vocab_size": 400,
                "sample_bytes": 200_000,
            },
            "tokenize": {
                "kind": "tokenize",
                "after": ["tokenizer"],
                "source": source,
                "num_workers": 1,
                "shard_tokens": 20_000,
            },
        },
    }
    kill_when = "tokenize/checkpoints/tokens/train/shard_00004.json"
    reference, killed = kill_then_resume(tmp_path, recipe, kill_when)
    summary = json.loads((killed / "tokenize" / "stage.json").read_text())["summary"]
    assert summary["resumed_documents"] > 0
    expected = files(reference / "tokenize" / "export")
    assert len([name for name in expected if name.startswith("train/")]) >= 2 * 10
    assert files(killed / "tokenize" / "export") == expected
