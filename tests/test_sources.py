"""Text sources: every file format, built-ins, limits, determinism and one-line user errors."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import zstandard

from data_prep.sources import SourceConfig, iter_documents, source_signature
from pipeline.engine.errors import PipelineError

DOCS = ["first document\nwith two lines\n", "  second, indented\ttab", "third: 中文 😀"]


def docs(uri: str | Path, **kwargs: object) -> list[str]:
    return list(iter_documents(SourceConfig(uri=str(uri), **kwargs)))


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def test_bare_string_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = SourceConfig.model_validate("data/x.jsonl")
    assert cfg.uri == str(tmp_path / "data" / "x.jsonl")
    assert SourceConfig.model_validate("builtin:python-stdlib").uri == "builtin:python-stdlib"
    with pytest.raises(ValueError, match="unknown built-in"):
        SourceConfig.model_validate("builtin:nope")


def test_txt_one_document_per_file_sorted_glob(tmp_path: Path) -> None:
    for name, text in zip(["b.txt", "a.txt", "c.txt"], DOCS, strict=True):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert docs(tmp_path / "*.txt", separator="file") == [DOCS[1], DOCS[0], DOCS[2]]
    assert docs(tmp_path / "b.txt", separator="file") == [DOCS[0]]


def test_txt_separators(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("one\n  two\n\n\n\nthree 中文\n \nfour\n".encode())
    assert docs(path) == ["one\n  two", "three 中文\n \nfour"]  # a line of spaces is text
    assert docs(path, separator="blank_line") == docs(path)
    assert docs(path, separator="line") == ["one", "  two", "three 中文", " ", "four"]
    assert docs(path, separator="file") == [path.read_text(encoding="utf-8")]
    with pytest.raises(ValueError, match="separator"):
        SourceConfig.model_validate({"uri": "builtin:python-stdlib", "separator": "line"})
    with pytest.raises(ValueError, match="blank_line"):
        SourceConfig.model_validate({"uri": str(path), "separator": "paragraph"})


def test_txt_crlf_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\n\r\nthree\r\n\r\nfour")
    assert docs(path) == ["one\r\ntwo", "three", "four"]
    assert docs(path, separator="line") == ["one", "two", "three", "four"]
    path.write_bytes(b"a\n\nb")
    assert docs(path) == ["a", "b"] and docs(path, separator="line") == ["a", "b"]
    assert docs(path, separator="file") == ["a\n\nb"]


def test_txt_document_spanning_read_chunks(tmp_path: Path) -> None:
    """A paragraph larger than a read chunk is one document; one over the bound is cut at line
    ends into pieces that fit and that join back to it."""
    from data_prep.text_files import MAX_DOCUMENT_BYTES, READ_BYTES

    line = "x = 1  # é 😀\n"
    big = line * (2 * READ_BYTES // len(line.encode()))
    huge = line * (2 * MAX_DOCUMENT_BYTES // len(line.encode()) + 7)
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f"head\n\n{big}\n{huge}\ntail")
    out = docs(path)
    assert out[:2] == ["head", big.removesuffix("\n")] and out[-1] == "tail"
    pieces = out[2:-1]
    assert len(pieces) == 3 and "".join(pieces) == huge.removesuffix("\n")
    assert all(len(p.encode()) <= MAX_DOCUMENT_BYTES and p.endswith("\n") for p in pieces[:-1])
    one_line = tmp_path / "line.txt"  # no line end to cut at: cut between characters
    one_line.write_text("é" * MAX_DOCUMENT_BYTES, encoding="utf-8")
    assert [len(p) for p in docs(one_line)] == [MAX_DOCUMENT_BYTES // 2] * 2


def test_txt_reads_in_bounded_memory(tmp_path: Path) -> None:
    """Streaming a file much larger than the read chunk allocates about one chunk at a time."""
    import tracemalloc

    from data_prep.text_files import READ_BYTES

    path = tmp_path / "big.txt"
    paragraph = ("A line of prose that goes on for a while. " * 16 + "\n") * 3 + "\n"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(32 * READ_BYTES // len(paragraph)):
            f.write(paragraph)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents(SourceConfig(uri=str(path))))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 32 * READ_BYTES // len(paragraph)
    assert peak < 6 * READ_BYTES, f"peak {peak} bytes reading a {path.stat().st_size} byte file"


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_compressed(tmp_path: Path, suffix: str) -> None:
    data = jsonl_bytes(DOCS, field="body") + b"\n"
    if suffix == ".gz":
        data = gzip.compress(data)
    elif suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"d.jsonl{suffix}"
    path.write_bytes(data)
    assert docs(path, text_field="body") == DOCS


def test_txt_zst(tmp_path: Path) -> None:
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(DOCS[2].encode()))
    assert docs(tmp_path / "a.txt.zst") == [DOCS[2]]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(2500)]
    pq.write_table(pa.table({"content": texts, "n": list(range(2500))}), tmp_path / "d.parquet")
    assert docs(tmp_path / "d.parquet", text_field="content") == texts
    with pytest.raises(PipelineError, match=r"no column 'text' \(columns: content, n\)"):
        docs(tmp_path / "d.parquet")
    packed = zstandard.ZstdCompressor().compress((tmp_path / "d.parquet").read_bytes())
    (tmp_path / "d.parquet.zst").write_bytes(packed)  # spilled to a temp file, read by batch
    assert docs(tmp_path / "d.parquet.zst", text_field="content") == texts


@pytest.mark.parametrize("as_dict", [False, True])
def test_hf_dataset_dir(tmp_path: Path, as_dict: bool) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS})
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    ds.save_to_disk(str(tmp_path / "hf"))
    assert docs(tmp_path / "hf") == DOCS
    assert source_signature(SourceConfig(uri=str(tmp_path / "hf")))["files"]


def test_builtins_are_deterministic() -> None:
    cfg = SourceConfig(uri="builtin:python-stdlib", max_documents=5)
    first = list(iter_documents(cfg))
    assert first == list(iter_documents(cfg)) and len(first) == 5
    assert source_signature(cfg)["python"] == sys.version
    arith = docs("builtin:arithmetic", max_documents=3)
    assert arith == docs("builtin:arithmetic", max_documents=3)
    line = arith[0].splitlines()[0]
    question, answer = line.removeprefix("What is ").split("? ")
    assert eval(question) == int(answer)


def test_task_sources_write_train_problems_of_their_task() -> None:
    from data_prep.tasks import SortTask, task_problems

    task = {"name": "sort", "min_length": 4, "max_length": 4}
    text = "\n".join(iter_documents(SourceConfig(uri="builtin:task", task=task, problems=64)))
    lines = text.splitlines()
    assert len(lines) == 64 and all(line.startswith("Sort ") for line in lines)
    for line in lines:
        digits, answer = line.removeprefix("Sort ").split(": ")
        assert answer == "".join(sorted(digits))
    sort4 = SortTask(min_length=4, max_length=4)
    held_out = {p["prompt"] for p in task_problems(sort4, "test", 900, 0)}
    assert not held_out & {line.split(" ")[0] + " " + line.split(" ")[1] for line in lines}
    with pytest.raises(ValueError, match="belong to builtin:task sources"):
        SourceConfig.model_validate({"uri": "builtin:python-stdlib", "problems": 3})


def test_limits(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(DOCS))
    assert docs(path, max_documents=2) == DOCS[:2]
    limit = len(DOCS[0].encode()) + 5
    out = docs(path, max_bytes=limit)
    assert out == [DOCS[0], DOCS[1][:5]]
    cut = docs(path, max_bytes=len((DOCS[0] + DOCS[1]).encode()) + 8)
    assert (
        cut[-1] == "third: "
        and sum(len(d.encode()) for d in cut) <= len((DOCS[0] + DOCS[1]).encode()) + 8
    )


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"nope\.jsonl: no such file"):
        docs(tmp_path / "nope.jsonl")
    with pytest.raises(PipelineError, match="glob matches no files"):
        docs(tmp_path / "*.jsonl")
    with pytest.raises(PipelineError, match="no such file"):
        source_signature(SourceConfig(uri=str(tmp_path / "nope.txt")))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(PipelineError, match="unsupported file type"):
        docs(tmp_path / "x.csv")


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(PipelineError, match=r"bad\.txt: not valid UTF-8 at byte offset 6"):
        docs(tmp_path / "bad.txt")
    late = (b"ok " * 999 + b"\n\n") * 1000 + b"caf\xe9\n\nmore"  # past the first read chunks
    (tmp_path / "late.txt").write_bytes(late)
    offset = late.index(b"\xe9")
    for separator in ("blank_line", "line", "file"):
        with pytest.raises(PipelineError, match=rf"late\.txt: not valid UTF-8 at byte offset "
                           rf"{offset} \(.*\); re-encode the file as UTF-8$"):  # fmt: skip
            docs(tmp_path / "late.txt", separator=separator)
    (tmp_path / "late.txt.gz").write_bytes(gzip.compress(late))
    with pytest.raises(PipelineError, match=rf"offset {offset} after decompression"):
        docs(tmp_path / "late.txt.gz")
    (tmp_path / "bad.jsonl").write_bytes(jsonl_bytes(["ok"]) + b'{"text": "\xc3("}\n')
    offset = len(jsonl_bytes(["ok"])) + len(b'{"text": "')
    with pytest.raises(
        PipelineError, match=rf"bad\.jsonl: not valid UTF-8 at byte offset {offset}"
    ):
        docs(tmp_path / "bad.jsonl")


def test_malformed_jsonl_and_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(DOCS) + b'{"text": "x",\n')
    with pytest.raises(PipelineError, match=r"d\.jsonl line 4: not valid JSON .*fix or remove"):
        docs(path)
    path.write_bytes(jsonl_bytes(DOCS, field="body"))
    with pytest.raises(PipelineError, match=r"line 1: no field 'text' \(fields: body, id\)"):
        docs(path)
    path.write_bytes(b'{"text": 3}\n')
    with pytest.raises(PipelineError, match="is int, not text"):
        docs(path)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"\n\n")
    with pytest.raises(PipelineError, match="no documents"):
        docs(tmp_path / "e.jsonl")
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(PipelineError, match="empty corpus"):
        docs(tmp_path / "e.txt")


def test_signature_tracks_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one")
    cfg = SourceConfig(uri=str(tmp_path / "*.txt"))
    before = source_signature(cfg)
    path.write_text("one two")
    assert source_signature(cfg) != before


def test_separator_is_in_the_fingerprint(tmp_path: Path) -> None:
    """Changing a text source's separator makes the stages that read it stale."""
    from pipeline.engine.config import validate_recipe
    from pipeline.engine.graph import fingerprints

    (tmp_path / "a.txt").write_text("one\n\ntwo\n")

    def prints(separator: str) -> dict[str, str]:
        source = {"uri": str(tmp_path / "a.txt"), "separator": separator}
        stages = {
            "tokenizer": {"kind": "tokenizer", "source": source},
            "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source},
        }
        return fingerprints(validate_recipe({"name": "x", "stages": stages}))

    blank, line = prints("blank_line"), prints("line")
    assert blank == prints("blank_line")
    assert all(blank[stage] != line[stage] for stage in ("tokenizer", "tokenize"))


def test_post_training_jsonl_shares_the_source_reader(tmp_path: Path) -> None:
    """SFT/reward/RLHF data files get the same formats and one-line errors as text sources."""
    from pipeline.stages.rows import read_jsonl

    good = tmp_path / "pairs.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "2+2=", "completion": "4"}\n\n{"prompt": "1+1=", "completion": "2"}\n')
    rows = read_jsonl(str(good), (("prompt", "completion"),), "stages.sft")
    assert [r["completion"] for r in rows] == ["4", "2"]

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match=r"latin1\.jsonl: not valid UTF-8 at byte offset 15"):
        read_jsonl(str(bad), (("prompt",),), "stages.rlhf")
    with pytest.raises(PipelineError, match="a row needs the keys chosen/rejected"):
        read_jsonl(str(good), (("chosen", "rejected"),), "stages.reward")


def test_mixture_interleaves_sources_with_their_own_caps(tmp_path: Path) -> None:
    from data_prep.sources import SourceStageConfig, mixed_documents

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes([f"a{i}" for i in range(5)]))
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes([f"b{i}" for i in range(2)]))
    cfg = SourceStageConfig.model_validate(
        {
            "kind": "x",
            "source": [
                {"uri": str(tmp_path / "a.jsonl"), "max_documents": 4},
                {"uri": str(tmp_path / "b.jsonl"), "repeat": 3},
            ],
        }
    )
    mixed = list(mixed_documents(cfg.source))
    assert mixed == [("a0", 1), ("b0", 3), ("a1", 1), ("b1", 3), ("a2", 1), ("a3", 1)]
    assert len(cfg.data_signature()["sources"]) == 2
    single = SourceStageConfig.model_validate({"kind": "x", "source": "builtin:arithmetic"})
    assert [s.uri for s in single.source] == ["builtin:arithmetic"]
    with pytest.raises(ValueError, match="empty list of sources"):
        SourceStageConfig.model_validate({"kind": "x", "source": []})
