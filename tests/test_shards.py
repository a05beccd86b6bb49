"""Token shards (format, checksums, deterministic batches) and the tokenize function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import ShardWriter, TokenShards, token_dtype
from data_prep.sources import SourceConfig, iter_documents
from data_prep.tokenize import read_meta, tokenize_corpus
from data_prep.tokenizer import EOS_ID, train_tokenizer
from pipeline.engine.errors import PipelineError


def write_split(split_dir: Path, tokens: np.ndarray, shard_tokens: int = 1000) -> TokenShards:
    with ShardWriter(split_dir, np.uint16, shard_tokens) as writer:
        for doc in np.array_split(tokens, 7):
            writer.add(doc)
    return TokenShards(split_dir)


@pytest.fixture
def stream() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 5000, size=10_007).astype(np.int64)


def test_round_trip_across_shards(tmp_path: Path, stream: np.ndarray) -> None:
    shards = write_split(tmp_path / "train", stream)
    assert shards.num_tokens == len(stream) and shards.num_documents == 7
    assert len(shards.index) == 11 and not list((tmp_path / "train").glob(".*tmp"))
    index = json.loads((tmp_path / "train" / "shard_00000.json").read_text())
    assert index["dtype"] == "uint16" and index["num_tokens"] == 1000
    assert np.array_equal(shards.tokens(0, len(stream)), stream)
    assert np.array_equal(shards.tokens(995, 2010), stream[995:2010])
    shards.verify()
    counts = shards.token_counts(5000)
    assert np.array_equal(counts, np.bincount(stream, minlength=5000))


def test_dtype_by_vocab_size(tmp_path: Path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = np.array([0, 70_000, 3, 100_000], dtype=np.int64)
    with ShardWriter(tmp_path / "s", token_dtype(200_000), 10) as writer:
        writer.add(big)
    shards = TokenShards(tmp_path / "s")
    assert shards.index[0]["dtype"] == "uint32"
    assert np.array_equal(shards.tokens(0, 4), big)


def test_flipped_byte_fails_verify(tmp_path: Path, stream: np.ndarray) -> None:
    write_split(tmp_path / "train", stream)
    path = tmp_path / "train" / "shard_00003.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"shard_00003\.bin: checksum mismatch"):
        TokenShards(tmp_path / "train").verify()


def test_truncated_shard_fails_at_open(tmp_path: Path, stream: np.ndarray) -> None:
    write_split(tmp_path / "train", stream)
    path = tmp_path / "train" / "shard_00002.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(PipelineError, match=r"shard_00002\.bin: 1998 bytes, index says 2000"):
        TokenShards(tmp_path / "train")


def test_batches_are_pure_and_vary(tmp_path: Path, stream: np.ndarray) -> None:
    shards = write_split(tmp_path / "train", stream)
    args = dict(seed=1, rank=0, world_size=1, micro_batch_size=4, seq_len=64)
    a = shards.batch(step=3, **args)
    assert a.shape == (4, 65) and a.dtype == np.int64
    assert np.array_equal(a, TokenShards(tmp_path / "train").batch(step=3, **args))
    assert not np.array_equal(a, shards.batch(step=4, **args))
    assert not np.array_equal(a, shards.batch(step=3, **{**args, "seed": 2}))
    windows = {tuple(stream[i * 64 : i * 64 + 65]) for i in range((len(stream) - 1) // 64)}
    assert all(tuple(row) in windows for row in a)


def step_samples(shards: TokenShards, step: int, world_size: int, micro: int, accum: int) -> set:
    rows = set()
    for rank in range(world_size):
        for micro_step in range(accum):
            batch = shards.batch(0, step, rank, world_size, micro, 32, micro_step, accum)
            rows |= {tuple(r) for r in batch}
    return rows


def test_union_over_ranks_depends_only_on_global_batch(tmp_path: Path, stream: np.ndarray) -> None:
    shards = write_split(tmp_path / "train", stream)
    for step in (0, 5, 400):
        single = step_samples(shards, step, world_size=1, micro=8, accum=1)
        assert len(single) == 8
        assert single == step_samples(shards, step, world_size=2, micro=4, accum=1)
        assert single == step_samples(shards, step, world_size=2, micro=2, accum=2)
        assert single == step_samples(shards, step, world_size=4, micro=1, accum=2)


def test_epoch_visits_every_window_once(tmp_path: Path, stream: np.ndarray) -> None:
    shards = write_split(tmp_path / "train", stream)
    num_windows = shards.num_windows(100)
    assert num_windows == (len(stream) - 1) // 100
    seen = [tuple(shards.batch(7, step, 0, 1, 1, 100)[0]) for step in range(num_windows)]
    assert sorted(seen) == sorted(tuple(w) for w in shards.windows(100))


def test_windows_are_sequential(tmp_path: Path, stream: np.ndarray) -> None:
    shards = write_split(tmp_path / "train", stream)
    windows = list(shards.windows(1000, max_windows=3))
    assert len(windows) == 3
    for i, w in enumerate(windows):
        assert np.array_equal(w, stream[i * 1000 : i * 1000 + 1001])
    assert len(list(shards.windows(1000))) == 10


def test_too_few_tokens(tmp_path: Path) -> None:
    shards = write_split(tmp_path / "train", np.arange(50))
    with pytest.raises(PipelineError, match="has 50 tokens, needs at least seq_len\\+1 = 65"):
        shards.batch(0, 0, 0, 1, 2, 64)
    with pytest.raises(PipelineError, match="shorter seq_len"):
        list(shards.windows(64))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    source = SourceConfig(uri="builtin:python-stdlib", max_bytes=200_000)
    train_tokenizer(iter_documents(source), out, vocab_size=500)
    return out / "tokenizer.model"


def split_documents(export: Path, split: str, sp: object) -> list[str]:
    shards = TokenShards(export / split)
    tokens = shards.tokens(0, shards.num_tokens)
    assert shards.num_tokens > 0 and tokens[-1] == EOS_ID  # every document ends with EOS
    ends = np.flatnonzero(tokens == EOS_ID)
    pieces = np.split(tokens, ends + 1)[:-1]
    return [sp.decode(p[:-1].tolist()) for p in pieces]  # type: ignore[attr-defined]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_tokenize_corpus(tmp_path: Path, model_path: Path, num_workers: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    docs = [f"document {i}\n    indented {'x' * (i % 13)}\n" for i in range(300)]
    stats = tokenize_corpus(
        docs,
        model_path,
        tmp_path,
        seed=3,
        val_fraction=0.1,
        num_workers=num_workers,
        shard_tokens=997,
    )
    train = split_documents(tmp_path, "train", sp)
    val = split_documents(tmp_path, "val", sp)
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert 10 <= len(val) <= 60 and stats["documents"] == 300
    meta = read_meta(tmp_path)
    assert meta["splits"]["val"] == {"num_tokens": stats["val_tokens"], "num_documents": len(val)}
    assert meta["splits"]["train"]["num_tokens"] == stats["train_tokens"]
    assert meta["vocab_size"] == 500 and meta["eos_id"] == EOS_ID and meta["dtype"] == "uint16"
    expected = sum(len(sp.encode(d)) + 1 for d in docs)
    assert stats["train_tokens"] + stats["val_tokens"] == expected
    TokenShards(tmp_path / "train").verify()


def test_tokenize_is_deterministic_and_keeps_one_val_doc(tmp_path: Path, model_path: Path) -> None:
    docs = ["alpha beta", "gamma delta", "epsilon"]
    tokenize_corpus(docs, model_path, tmp_path / "a", val_fraction=0.01, num_workers=1)
    tokenize_corpus(docs, model_path, tmp_path / "b", val_fraction=0.01, num_workers=1)
    for name in ("train/shard_00000.bin", "val/shard_00000.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_meta(tmp_path / "a")["splits"]["val"]["num_documents"] == 1
    with pytest.raises(PipelineError, match="empty corpus"):
        tokenize_corpus([], model_path, tmp_path / "c", num_workers=1)


def test_tokenize_repeats_upsample_train_and_keep_val_single(
    tmp_path: Path, model_path: Path
) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    docs = [(f"common text {i}", 1) for i in range(100)] + [(f"rare {i} x", 3) for i in range(100)]
    tokenize_corpus(docs, model_path, tmp_path, seed=1, val_fraction=0.2, num_workers=1)
    train = split_documents(tmp_path, "train", sp)
    val = split_documents(tmp_path, "val", sp)
    rare_train = [d for d in train if d.startswith("rare")]
    assert rare_train and all(rare_train.count(d) == 3 for d in rare_train)
    assert all(train.count(d) == 1 for d in train if d.startswith("common"))
    assert len(val) == len(set(val)) and not set(val) & set(train)
    assert len(set(train)) + len(val) == 200


@pytest.mark.parametrize("more_docs", [1, 9])
def test_shard_writer_resumes_from_its_state(tmp_path: Path, more_docs: int) -> None:
    """A writer given a recorded state drops what came after it (a committed shard, or a longer
    temp file) and ends with the same files as a writer that never stopped."""
    docs = np.array_split(np.random.default_rng(1).integers(0, 60_000, 5_000), 40)
    with ShardWriter(tmp_path / "ref", np.uint16, 333) as writer:
        for doc in docs:
            writer.add(doc)
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path / "x", np.uint16, 333, True) as w:
        for doc in docs[:20]:
            w.add(doc)
        state = w.state()
        for doc in docs[20 : 20 + more_docs]:  # 9 more documents commit the open shard
            w.add(doc)
        raise KeyboardInterrupt
    assert (w.num_shards > state["num_shards"]) == (more_docs == 9) and state["open_tokens"]
    resumed = ShardWriter(tmp_path / "x", np.uint16, 333, True)
    resumed.resume(state)
    with resumed:
        for doc in docs[20:]:
            resumed.add(doc)
    ref, out = sorted((tmp_path / "ref").iterdir()), sorted((tmp_path / "x").iterdir())
    assert [p.name for p in out] == [p.name for p in ref]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ref, out, strict=True))
    with pytest.raises(ValueError, match="missing or not the size its index says"):
        ShardWriter(tmp_path / "x", np.uint16, 333, True).resume({**state, "num_shards": 99})


def test_empty_split_names_the_real_cause(tmp_path: Path, model_path: Path) -> None:
    """A 3,000-line text file splits into paragraphs, so val gets some; one whole-file document
    cannot, and the empty val split says why rather than blaming seq_len."""
    path = tmp_path / "input.txt"
    paragraphs = ["\n".join(f"line {i + j} of the text" for j in range(5)) for i in range(500)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    assert len(path.read_text().splitlines()) == 500 * 6 - 1
    split = iter_documents(SourceConfig(uri=str(path)))
    tokenize_corpus(split, model_path, tmp_path / "a", num_workers=1)
    assert read_meta(tmp_path / "a")["splits"]["val"]["num_documents"] >= 3
    whole = iter_documents(SourceConfig(uri=str(path), separator="file"))
    tokenize_corpus(whole, model_path, tmp_path / "b", num_workers=1)
    val = TokenShards(tmp_path / "b" / "val")
    with pytest.raises(PipelineError, match="too few documents .* separator blank_line"):
        val.batch(0, 0, 0, 1, 2, 64)
