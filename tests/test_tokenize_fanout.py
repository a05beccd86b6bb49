"""Tokenize fan-out: a source split into parts, encoded by separate processes and merged, gives the
same export bytes (every shard, every index, meta.json) as one process."""

from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.fanout import is_val_document, merge_parts, plan_parts, write_part
from data_prep.shards import ShardWriter
from data_prep.sources import SourceConfig
from tests.helpers import cli, write_recipe

pytestmark = pytest.mark.e2e  # the local fan-out tests run `pipeline run` in a subprocess

WORDS = ["alpha", "beta", "x = 1", "\tindent", "two  spaces", "é ü", "中", "tokens", "merge"]


def paragraphs(rng: random.Random, count: int) -> list[str]:
    """Documents of varied length (one to many lines), some very short."""
    return [
        "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
            for _ in range(rng.randint(1, 6))
        )
        for _ in range(count)
    ]


def big_txt(path: Path, count: int = 6000) -> Path:
    """One .txt of blank-line-separated documents, with CRLF blank lines and runs of blank lines."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        for i, doc in enumerate(paragraphs(rng, count)):
            separator = [b"\n\n", b"\r\n\r\n", b"\n\n\n\n", b"\n\r\n"][i % 4]
            f.write(doc.encode() + separator)
    return path


def many_files(folder: Path) -> Path:
    """Seven files of three formats (one gzipped, one empty), sizes from 0 to ~120 KB."""
    rng = random.Random(11)
    folder.mkdir()
    for i, count in enumerate([300, 40, 900, 1, 500, 0, 200]):
        docs = paragraphs(rng, count)
        if i % 3 == 0:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
            (folder / f"f{i}.jsonl").write_text(lines, encoding="utf-8")
        elif i == 4:
            (folder / f"f{i}.txt.gz").write_bytes(gzip.compress("\n\n".join(docs).encode()))
        else:
            (folder / f"f{i}.txt").write_text("\n\n".join(docs), encoding="utf-8")
    return folder


def recipe_for(tmp_path: Path, source: dict[str, Any]) -> Path:
    """tokenizer + tokenize on `source`, small shards so there are many of them."""
    tokenizer_source = {"uri": source["uri"]}
    data = {
        "name": "fanout",
        "run_dir": str(tmp_path / "runs" / "fanout"),
        "seed": 3,
        "tracking": {"mode": "disabled"},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "source": tokenizer_source, "vocab_size": 300},
            "tokenize": {
                "kind": "tokenize",
                "after": ["tokenizer"],
                "source": source,
                "num_workers": 1,
                "shard_tokens": 2999,
                "val_fraction": 0.1,
            },
        },
    }
    return write_recipe(tmp_path / "fanout.yaml", data)


def export_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_both(tmp_path: Path, source: dict[str, Any], parts: int = 3) -> dict[str, bytes]:
    """The export of parts=1, asserted equal to the export of parts=`parts`; returns it."""
    recipe = recipe_for(tmp_path, source)
    export = tmp_path / "runs" / "fanout" / "tokenize" / "export"
    single = cli("run", str(recipe))
    assert single.returncode == 0, single.stdout + single.stderr
    expected = export_files(export)
    fanned = cli("run", str(recipe), "-o", f"stages.tokenize.parts={parts}")
    assert fanned.returncode == 0, fanned.stdout + fanned.stderr
    got = export_files(export)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    log = (tmp_path / "runs" / "fanout" / "tokenize" / "stage.log").read_text()
    assert f"encoding parts [0, 1, 2] of {parts} in {parts} processes" in log
    assert not (tmp_path / "runs" / "fanout" / "tokenize" / "parts").exists()
    return got


def test_tokenize_fanout_multi_file_source_equals_single_process(tmp_path: Path) -> None:
    source = {"uri": str(many_files(tmp_path / "data")) + "/f*", "repeat": 2}
    plan = plan_parts(SourceConfig.model_validate(source), 3)
    assert len(plan) == 3 and all(plan)
    got = run_both(tmp_path, source)
    meta = json.loads(got["meta.json"])
    assert meta["splits"]["val"]["num_documents"] > 0
    assert sum(1 for name in got if name.startswith("train/") and name.endswith(".bin")) > 3


def test_tokenize_fanout_big_txt_split_by_byte_ranges_equals_single_process(
    tmp_path: Path,
) -> None:
    path = big_txt(tmp_path / "input.txt")
    plan = plan_parts(SourceConfig(uri=str(path)), 3)
    ranges = [piece for part in plan for piece in part]
    assert len(ranges) == 3 and all(end is not None for _, _, end in ranges[:2])
    assert ranges[0][1] == 0 and ranges[0][2] == ranges[1][1] and ranges[1][2] == ranges[2][1]
    run_both(tmp_path, {"uri": str(path)})


def test_tokenize_fanout_line_separator_cuts_at_line_ends(tmp_path: Path) -> None:
    path = big_txt(tmp_path / "lines.txt", count=400)
    source = SourceConfig(uri=str(path), separator="line")
    data = path.read_bytes()
    for part in plan_parts(source, 5)[1:]:
        for _, start, _ in part[:1]:
            assert data[start - 1 : start] == b"\n"


def test_tokenize_fanout_refuses_a_mixture_in_one_line(tmp_path: Path) -> None:
    path = big_txt(tmp_path / "input.txt", count=50)
    recipe = recipe_for(tmp_path, {"uri": str(path)})
    result = cli(
        "run", str(recipe), "--dry-run", "-o",
        f"stages.tokenize.source=[{path},{path}]", "-o", "stages.tokenize.parts=2",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parts=2" in lines[0] and "mixture" in lines[0], lines


def test_tokenize_fanout_merge_moves_last_document_to_empty_val(tmp_path: Path) -> None:
    """With no document hashed to val, the last one moves there, as in one process."""
    seed, fraction = 0, 1e-9
    assert not any(is_val_document(i, seed, fraction) for i in range(4))
    key = {"k": 1}
    dirs = []
    for index, docs in enumerate([[[5, 6, 1], [7, 1]], [], [[8, 8, 8, 1], [9, 1]]]):
        dirs.append(tmp_path / f"p{index}")
        encoded = ((np.array(d, np.uint16), None) for d in docs)
        write_part(dirs[-1], {**key, "part": index}, encoded, np.dtype(np.uint16), 0.0)
    splits = merge_parts(dirs, key, tmp_path / "out", np.dtype(np.uint16), 3, seed, fraction, 1)
    assert splits == {
        "train": {"num_tokens": 9, "num_documents": 3},
        "val": {"num_tokens": 2, "num_documents": 1},
    }
    train = b"".join(p.read_bytes() for p in sorted((tmp_path / "out" / "train").glob("*.bin")))
    assert np.frombuffer(train, np.uint16).tolist() == [5, 6, 1, 7, 1, 8, 8, 8, 1]


def test_tokenize_fanout_merge_cost_for_10000_shards(tmp_path: Path) -> None:
    """The merge's cost per shard: 10,000 tiny shards' worth of documents from 8 parts."""
    key, parts, dtype = {"k": 2}, 8, np.dtype(np.uint16)
    rng = np.random.default_rng(0)
    dirs = []
    for index in range(parts):
        lengths = rng.integers(1, 9, size=2500)
        encoded = ((np.ones(n, np.uint16), None) for n in lengths)
        dirs.append(tmp_path / f"p{index}")
        write_part(dirs[-1], {**key, "part": index}, encoded, dtype, 0.0)
    start = time.perf_counter()
    splits = merge_parts(dirs, key, tmp_path / "out", dtype, 8, 0, 0.0, 1)
    elapsed = time.perf_counter() - start
    shards = len(list((tmp_path / "out").glob("*/shard_*.json")))
    assert shards >= 10_000, shards
    print(f"merge: {shards} shards in {elapsed:.2f} s ({1e3 * elapsed / shards:.3f} ms/shard)")
    assert splits["train"]["num_documents"] == parts * 2500
    # the same files as ShardWriter.add document by document
    reference = tmp_path / "reference"
    with ShardWriter(reference, dtype, 8, sync=False) as writer:
        for part_dir in dirs:
            for n in np.load(part_dir / "lengths.npy"):
                writer.add(np.ones(n, np.uint16))
    assert export_files(reference) == export_files(tmp_path / "out" / "train")


def test_tokenize_fanout_submit_dry_run_renders_a_slurm_job_array(tmp_path: Path) -> None:
    path = big_txt(tmp_path / "input.txt", count=50)
    recipe = recipe_for(tmp_path, {"uri": str(path)})
    result = cli("submit", str(recipe), "--dry-run", "-o", "stages.tokenize.parts=4")
    assert result.returncode == 0, result.stdout + result.stderr
    slurm_dir = tmp_path / "runs" / "fanout" / "tokenize" / "slurm"
    lines = (slurm_dir / "parts.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-3" in lines
    assert any("pipeline.engine.slurm_job" in line and "--part" in line for line in lines)
    assert "--array" not in (slurm_dir / "job.sbatch").read_text()
