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
    assert docs(tmp_path / "*.txt") == [DOCS[1], DOCS[0], DOCS[2]]
    assert docs(tmp_path / "b.txt") == [DOCS[0]]


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


def test_post_training_jsonl_shares_the_source_reader(tmp_path: Path) -> None:
    """SFT/reward/RLHF data files get the same formats and one-line errors as text sources."""
    from pipeline.stages.posttrain import read_jsonl

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
