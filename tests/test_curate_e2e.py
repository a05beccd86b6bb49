"""The curate stage through the CLI: 3 parts give the bytes of 1, a kill -9 and a rerun give the
bytes of an uninterrupted run, and tokenize from a curate stage equals tokenize of its kept
documents given as files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, write_recipe
from tests.test_curate import planted

pytestmark = pytest.mark.e2e


def export_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def corpus_files(folder: Path) -> str:
    """The planted corpus split into 4 JSONL files (a glob, so that parts split by file)."""
    folder.mkdir()
    lines = (folder.parent / "corpus.jsonl").read_text().splitlines(keepends=True)
    for k in range(4):
        (folder / f"c{k}.jsonl").write_text("".join(lines[k::4]))
    return str(folder / "c*.jsonl")


def curate_recipe(tmp_path: Path, source: str, **stage: Any) -> Path:
    """Every step; lines then near and quality, so there are two passes."""
    data = {
        "name": "cur",
        "run_dir": str(tmp_path / "runs" / "cur"),
        "tracking": {"mode": "disabled"},
        "stages": {
            "curate": {
                "kind": "curate",
                "source": source,
                "steps": ["exact", "lines", "near", "quality", "decontaminate"],
                "lines": {"min_documents": 5},
                "quality": {"gopher_quality": None, "c4": None},
                "decontaminate": {"tasks": [{"name": "arithmetic"}]},
                **stage,
            }
        },
    }
    return write_recipe(tmp_path / "cur.yaml", data)


def test_curate_three_parts_and_kill_9_give_the_bytes_of_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted(tmp_path / "corpus.jsonl", originals=150)
    path = curate_recipe(tmp_path, corpus_files(tmp_path / "data"))
    stage_dir = tmp_path / "runs" / "cur" / "curate"
    single = cli("run", str(path))
    assert single.returncode == 0, single.stderr
    expected = export_files(stage_dir / "export")
    assert any(name.startswith("removed/decontaminate/") for name in expected)

    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setenv("PIPELINE_FAULT", "curate:data_write:2")  # after pass 1's parts
    killed = cli("run", str(path), "-o", "stages.curate.parts=3")
    assert killed.returncode != 0 and not (stage_dir / "export").exists()
    monkeypatch.delenv("PIPELINE_FAULT")
    rerun = cli("run", str(path), "-o", "stages.curate.parts=3")
    assert rerun.returncode == 0, rerun.stderr
    log = (stage_dir / "stage.log").read_text()
    assert "pass 0: analysing parts [0, 1, 2] of 3" in log  # the killed run
    assert log.count("pass 0: analysing") == 1  # the rerun reused every committed part
    assert export_files(stage_dir / "export") == expected
    assert not (stage_dir / "curate_work").exists()


def test_tokenize_from_curate_equals_tokenize_of_its_kept_files(tmp_path: Path) -> None:
    planted(tmp_path / "corpus.jsonl", originals=100)
    run_dir = tmp_path / "runs" / "tok"
    data = {
        "name": "tok",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "stages": {
            "curate": {"kind": "curate", "source": str(tmp_path / "corpus.jsonl")},
            "tokenizer": {"kind": "tokenizer", "after": ["curate"], "documents": "curate",
                          "vocab_size": 300},
            "tokenize": {"kind": "tokenize", "after": ["tokenizer", "curate"],
                         "documents": "curate", "num_workers": 1, "shard_tokens": 5000},
        },
    }  # fmt: skip
    path = write_recipe(tmp_path / "tok.yaml", data)
    first = cli("run", str(path))
    assert first.returncode == 0, first.stderr
    from_stage = export_files(run_dir / "tokenize" / "export")
    kept = run_dir / "curate" / "export" / "kept" / "corpus"
    copy = tmp_path / "kept"
    shutil.copytree(kept, copy)
    files = cli(
        "run", str(path), "-o", "stages.tokenize.documents=null",
        "-o", f"stages.tokenize.source={copy}/*.jsonl.zst",
    )  # fmt: skip
    assert files.returncode == 0, files.stderr
    assert export_files(run_dir / "tokenize" / "export") == from_stage
    assert len([n for n in from_stage if n.startswith("train/")]) > 4
