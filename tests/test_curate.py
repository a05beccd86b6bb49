"""The curate stage on planted corpora with known answers: exact copies, near copies at measured
Jaccard similarities, edited copies that must stay, boilerplate lines, low-quality documents and
held-out task problems; plus its hand-off to tokenizer and tokenize, and its one-line errors."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from bench.curate_planting import edited, jaccard, vocabulary, write_planted
from data_prep import curate_confirm
from data_prep.curate_minhash import clusters
from data_prep.curate_options import NearOptions
from data_prep.curate_read import source_documents
from data_prep.documents_meta import DocumentsMeta
from data_prep.sources import SourceConfig, tagged_documents
from data_prep.tasks import ArithmeticTask, format_problem, task_problems
from tests.helpers import run_in_process, write_recipe


def planted(path: Path, seed: int = 0, originals: int = 300) -> dict[str, Any]:
    """A JSONL corpus of random-word documents, their copies and held-out problems inside text,
    and what each planted document is (indexes are document ids)."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    docs = [
        " ".join(rng.choice(words) for _ in range(rng.randint(120, 260))) for _ in range(originals)
    ]
    problems = [
        ("problem", format_problem(p)) for p in task_problems(ArithmeticTask(), "test", 12, 0)
    ]
    train = task_problems(ArithmeticTask(), "train", 12, 0)  # train problems: must stay
    extras = [*problems, ("train_problems", "\n".join(format_problem(p) for p in train))]
    truth = write_planted(path, docs, rng, words, {"exact": 30, "near": 40, "edited": 20}, extras)
    with path.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return {"texts": texts, "kinds": truth.kinds, "source_of": truth.source_of}


def read_shards(folder: Path) -> list[dict[str, Any]]:
    records = []
    for shard in sorted(folder.glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(shard.read_bytes())).read()
        records += [json.loads(line) for line in data.decode().splitlines()]
    return records


def recipe(tmp_path: Path, stages: dict[str, Any], name: str = "cur") -> Path:
    data = {
        "name": name,
        "run_dir": str(tmp_path / "runs" / name),
        "tracking": {"mode": "disabled"},
        "stages": stages,
    }
    return write_recipe(tmp_path / f"{name}.yaml", data)


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The planted corpus curated with exact, near and decontamination (the default steps)
    against the task another stage of the recipe names."""
    tmp_path = tmp_path_factory.mktemp("curate")
    truth = planted(tmp_path / "corpus.jsonl")
    task_source = {"uri": "builtin:task", "task": {"name": "arithmetic"}}
    stages = {
        "curate": {"kind": "curate", "source": str(tmp_path / "corpus.jsonl")},
        "tokenizer": {"kind": "tokenizer", "after": ["curate"], "source": task_source},
    }
    from pipeline.cli import main

    assert main(["run", str(recipe(tmp_path, stages)), "--only", "curate"]) == 0
    export = tmp_path / "runs" / "cur" / "curate" / "export"
    return {"truth": truth, "export": export}


def planted_pairs(truth: dict[str, Any], kind: str) -> list[tuple[int, int]]:
    """(copy, original) ids of the planted copies of one kind."""
    return [(c, o) for c, o in truth["source_of"].items() if truth["kinds"][c] == kind]


def removed(export: Path, step: str) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in read_shards(export / "removed" / step)}


def test_curate_exact_copies_all_removed_naming_the_first_copy(curated: dict[str, Any]) -> None:
    truth, gone = curated["truth"], removed(curated["export"], "exact")
    copies = planted_pairs(truth, "exact")
    assert {max(pair) for pair in copies} <= set(gone)  # recall 100%: the later copy goes
    for index, record in gone.items():
        kept = record["kept_id"]
        assert truth["texts"][kept] == truth["texts"][index] and kept < index


def test_curate_near_duplicates_precision_and_recall_against_true_jaccard(
    curated: dict[str, Any],
) -> None:
    truth, gone = curated["truth"], removed(curated["export"], "near")
    near = {max(pair) for pair in planted_pairs(truth, "near")}
    edited_ids = {copy for copy, _ in planted_pairs(truth, "edited")}
    duplicates = set(gone) | set(removed(curated["export"], "exact"))  # an original may go as
    recall = len(near & duplicates) / len(near)  # an exact copy of an earlier exact copy
    true_sims = [jaccard(truth["texts"][i], truth["texts"][r["kept_id"]]) for i, r in gone.items()]
    precision = sum(s >= 0.7 for s in true_sims) / max(len(gone), 1)
    print(f"near: recall {recall:.3f}, precision {precision:.3f} ({len(gone)} removed)")
    assert recall >= 0.95 and precision >= 0.99
    assert not edited_ids & set(gone)  # copies at Jaccard <= 0.5 stay
    for record in gone.values():
        assert record["reason"].startswith(f"near duplicate of document {record['kept_id']}")
    meta = DocumentsMeta.read(curated["export"])
    assert sum(meta.cluster_sizes.values()) >= 1 and set(meta.cluster_sizes) >= {2}


def test_curate_near_copy_after_an_original_and_its_exact_copy_is_removed(
    tmp_path: Path,
) -> None:
    """datatrove's bucket stage links each document of a band's group to the one before it; a
    document the exact step removed must not cut that chain: a near copy after an original and
    its exact copy is removed as a near duplicate of the original."""
    rng = random.Random(5)
    words = vocabulary(rng)
    docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(20)]
    near = edited(rng, docs[0], words, 0.85, 0.95)
    path = tmp_path / "chain.jsonl"
    corpus = [docs[0], *docs, near]  # 1: an exact copy of 0; 21: a near copy of 0
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    stage = {"kind": "curate", "source": str(path), "steps": ["exact", "near"]}
    from pipeline.cli import main

    assert main(["run", str(recipe(tmp_path, {"curate": stage}))]) == 0
    export = tmp_path / "runs" / "cur" / "curate" / "export"
    assert set(removed(export, "exact")) == {1}
    gone = removed(export, "near")
    assert set(gone) == {21} and gone[21]["kept_id"] == 0


def test_curate_clusters_link_past_a_candidate_the_signatures_reject() -> None:
    """In a band's group 0, 1, 2 where 1 is a chance candidate of both (estimated Jaccard 0.4),
    2 is still confirmed against 0 and removed naming it."""
    first = np.arange(112, dtype=np.uint64)
    chance, near = first.copy(), first.copy()
    chance[:67] += 1000
    near[:6] += 2000
    signatures = [first, chance, near]
    removed_docs, sizes = clusters(
        [np.array([0, 1, 2])], np.ones(3, bool), lambda i: signatures[i], 0.75
    )
    assert removed_docs == {2: (0, pytest.approx(106 / 112))} and sizes == {2: 1}


def test_curate_near_duplicates_do_not_chain_through_a_removed_document() -> None:
    """0 ~ 1 and 1 ~ 2 but 2 is far from 0: 1 goes naming 0, and 2 stays (joining every
    confirmed pair would remove 2 too, naming 0 at an estimated Jaccard of 0.6)."""
    first = np.arange(112, dtype=np.uint64)
    middle, last = first.copy(), first.copy()
    middle[:22] += 1000
    last[:45] += 1000
    signatures = [first, middle, last]
    removed_docs, sizes = clusters(
        [np.array([0, 1, 2])], np.ones(3, bool), lambda i: signatures[i], 0.75
    )
    assert removed_docs == {1: (0, pytest.approx(90 / 112))} and sizes == {2: 1}


def test_curate_near_pair_the_estimate_passes_but_the_true_jaccard_does_not_stays(
    tmp_path: Path,
) -> None:
    """The shingles gathered for confirmation give the true Jaccard similarity (as the planting
    measures it), and a pair whose signatures agree but whose shingles do not is kept."""
    rng = random.Random(7)
    words = vocabulary(rng)
    first = " ".join(rng.choice(words) for _ in range(300))
    near, far = edited(rng, first, words, 0.85, 0.95), edited(rng, first, words, 0.55, 0.65)
    shingles = curate_confirm.gather(
        iter([first, "other", near, far]), np.array([0, 2, 3]), NearOptions(), tmp_path / "s.bin"
    )
    assert shingles.jaccard(0, 2) == pytest.approx(jaccard(first, near))
    assert (
        shingles.jaccard(0, 3) == pytest.approx(jaccard(first, far)) and jaccard(first, far) < 0.7
    )
    same = np.arange(112, dtype=np.uint64)  # signatures that agree on every hash
    removed_docs, _ = clusters(
        [np.array([0, 2, 3])], np.ones(4, bool), lambda i: same, 0.75, shingles.jaccard
    )
    assert removed_docs == {2: (0, 1.0)}


def test_curate_decontamination_removes_every_planted_problem_and_nothing_else(
    curated: dict[str, Any],
) -> None:
    truth, gone = curated["truth"], removed(curated["export"], "decontaminate")
    problems = {i for i, kind in enumerate(truth["kinds"]) if kind == "problem"}
    assert set(gone) == problems
    assert all("task arithmetic" in r["reason"] for r in gone.values())


@pytest.mark.parametrize("ood", [True, False])
def test_curate_decontamination_covers_the_out_of_distribution_problems_eval_scores(
    tmp_path: Path, ood: bool
) -> None:
    """Documents holding a problem of the task's out-of-distribution split (what an eval's
    ood_problems scores) go too, named as such; `decontaminate: {ood: false}` keeps them."""
    rng = random.Random(1)
    words = vocabulary(rng)
    task = ArithmeticTask()
    held_out = [format_problem(p) for p in task_problems(task, "test", 3, 0)]
    out_of_range = [format_problem(p) for p in task_problems(task, "ood", 3, 0)]
    docs = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(12)]
    for i, item in enumerate(held_out + out_of_range):
        docs[2 * i] = f"{docs[2 * i]} {item} end."
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stages = {
        "curate": {
            "kind": "curate", "source": str(corpus), "steps": ["decontaminate"],
            "decontaminate": {"ood": ood},
        },
        "tokenizer": {"kind": "tokenizer", "after": ["curate"],
                      "source": {"uri": "builtin:task", "task": {"name": "arithmetic"}}},
    }  # fmt: skip
    from pipeline.cli import main

    assert main(["run", str(recipe(tmp_path, stages)), "--only", "curate"]) == 0
    gone = removed(tmp_path / "runs" / "cur" / "curate" / "export", "decontaminate")
    assert {i for i in gone if i < 6} == {0, 2, 4} and all(i % 2 == 0 for i in gone)
    assert {i for i in gone if i >= 6} == ({6, 8, 10} if ood else set())
    for i in gone:
        assert ("task arithmetic ood" in gone[i]["reason"]) == (i >= 6)


def test_curate_kept_documents_carry_provenance_and_counts_add_up(curated: dict[str, Any]) -> None:
    export, truth = curated["export"], curated["truth"]
    kept = read_shards(export / "kept" / "corpus")
    for record in kept:
        assert record["text"] == truth["texts"][record["id"]]
        assert record["file"].endswith("corpus.jsonl") and record["row"] == record["id"]
    meta = DocumentsMeta.read(export)
    (source,) = meta.sources
    removed_total = sum(c.documents for s in meta.steps for c in s.removed.values())
    assert source.kept.documents == len(kept) == source.read.documents - removed_total
    assert source.read.documents == len(truth["texts"])


def test_curate_lines_and_quality_steps(tmp_path: Path) -> None:
    """A line in 25 documents is cut from each; a document of only boilerplate goes, and so
    does a document repeating one line (Gopher repetition); steps after `lines` see the cut text."""
    rng = random.Random(3)
    words = vocabulary(rng)
    footer = "Subscribe to our newsletter for weekly updates and offers"
    docs = []
    for i in range(60):
        body = " ".join(rng.choice(words) for _ in range(80))
        docs.append(f"{body}\n{footer}" if i < 25 else body)
    docs.append(footer)  # nothing left once the footer is cut
    docs.append("\n".join(["the same line again and again"] * 30))
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    quality = {"gopher_quality": None, "c4": None}
    stage = {"kind": "curate", "source": str(path), "steps": ["lines", "quality"],
             "lines": {"min_documents": 20}, "quality": quality}  # fmt: skip
    from pipeline.cli import main

    assert main(["run", str(recipe(tmp_path, {"curate": stage}))]) == 0
    export = tmp_path / "runs" / "cur" / "curate" / "export"
    kept = read_shards(export / "kept" / "lines")
    assert len(kept) == 60 and all(footer not in r["text"] for r in kept)
    assert set(removed(export, "lines")) == {60}
    assert set(removed(export, "quality")) == {61}
    meta = DocumentsMeta.read(export)
    assert meta.steps[0].lines_cut["lines"].documents == 25


def test_curate_reader_gives_the_documents_tokenize_reads(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo two\n\n\nthree\n\n" * 5)
    sources = [
        SourceConfig(uri=str(path), max_bytes=40),
        SourceConfig(uri="builtin:task", task={"name": "sort"}, problems=40),
    ]
    ours = [(d.text, d.source) for d in source_documents(sources)]
    assert ours == [(text, source) for text, _, source in tagged_documents(sources)]
    rows = [d.row for d in source_documents(sources[:1])]
    assert rows == list(range(len(rows)))


BAD = {
    "bands x rows": ({"near": {"bands": 14, "rows": 9}}, "bands x rows = 14 x 9 = 126"),
    "threshold": ({"near": {"threshold": 0.3}}, "threshold 0.3"),
    "unknown step": ({"steps": ["exact", "fuzzy"]}, "stages.curate.steps.1"),
    "options of an unlisted step": ({"lines": {"min_documents": 3}}, "leaves out"),
    "missing file": (
        {"decontaminate": {"files": [{"path": "/nonexistent/evals.jsonl"}]}},
        "stages.curate.decontaminate.files.0: /nonexistent/evals.jsonl: no such file",
    ),
    "parts of a mixture": ({"parts": 2, "source": ["builtin:python-stdlib"] * 2}, "mixture"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_curate_dry_run_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, expected = BAD[case]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    stage = {"kind": "curate", "source": str(path), **change}
    code, err = run_in_process(
        ["run", str(recipe(tmp_path, {"curate": stage})), "--dry-run"], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_curate_consumers_refuse_a_stage_that_is_not_curate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    stages = {
        "tokenizer": {"kind": "tokenizer", "source": str(path), "vocab_size": 300},
        "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "documents": "tokenizer"},
    }
    code, err = run_in_process(["run", str(recipe(tmp_path, stages)), "--dry-run"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "stages.tokenize.documents: 'tokenizer' is a tokenizer stage" in lines[0]
    assert "name a stage that makes documents (curate)" in lines[0]


def test_curate_non_utf8_bytes_fail_in_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine text\n\nmore fine text\n\nbroken \xff\xfe bytes\n")
    stage = {"kind": "curate", "source": str(path), "steps": ["exact"]}
    code, err = run_in_process(["run", str(recipe(tmp_path, {"curate": stage}))], capsys)
    assert code != 0
    line = next(line for line in err.splitlines() if "UTF-8" in line)
    assert str(path) in line and "re-encode the file as UTF-8" in line
