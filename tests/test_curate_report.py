"""The curate stage's report sections, metrics.jsonl row and W&B payload hold the numbers of its
export: the counts are those of the kept/ and removed/ folders, the cluster histogram that of the
removed near duplicates' kept ids, and the examples cover every reason."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.curate_planting import vocabulary
from data_prep import curate_report
from data_prep.documents_meta import DocumentsMeta
from tests.test_curate import planted, read_shards, recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two sources: the planted corpus, and one with exact copies of it and repetitive text."""
    tmp_path = tmp_path_factory.mktemp("curate_report")
    truth = planted(tmp_path / "web.jsonl", originals=120)
    rng = random.Random(1)
    words = vocabulary(rng)
    extra = [truth["texts"][k] for k in (3, 8, 20)]  # exact copies of documents of `web`
    extra += ["\n".join(["one line said again and again here"] * 30)]  # repeated lines
    extra += [" ".join(["tick tock"] * 200)]  # repeated 2-grams
    extra += [" ".join(rng.choice(words) for _ in range(150)) for _ in range(5)]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    stage = {
        "kind": "curate",
        "source": [{"uri": str(tmp_path / "web.jsonl"), "name": "web"},
                   {"uri": str(tmp_path / "extra.jsonl"), "name": "extra"}],
        "steps": ["exact", "near", "quality", "decontaminate"],
        "quality": {"gopher_quality": None, "c4": None},
        "decontaminate": {"tasks": [{"name": "arithmetic"}]},
    }  # fmt: skip
    from pipeline.cli import main

    path = recipe(tmp_path, {"curate": stage})
    assert main(["run", str(path)]) == 0
    stage_dir = tmp_path / "runs" / "cur" / "curate"
    return {"path": path, "stage_dir": stage_dir, "export": stage_dir / "export"}


def sections(export: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((export / "report.json").read_text())
    return {section["title"]: section for section in data["sections"]}


def test_curate_report_counts_are_the_kept_and_removed_folders(run: dict[str, Any]) -> None:
    export = run["export"]
    section = sections(export)[curate_report.COUNTS_TITLE]
    table = {(row[0], row[1]): row[2:4] for row in section["rows"]}
    meta = DocumentsMeta.read(export)
    for step in meta.steps:
        found = Counter()
        for record in read_shards(export / "removed" / step.step):
            found[record["source"], "documents"] += 1
            found[record["source"], "bytes"] += len(record["text"].encode())
        for source in ("web", "extra"):
            assert table[step.step, source] == [found[source, "documents"], found[source, "bytes"]]
        all_docs = found["web", "documents"] + found["extra", "documents"]
        assert table[step.step, "all"][0] == all_docs
    for source in ("web", "extra"):
        kept = read_shards(export / "kept" / source)
        assert table["kept", source] == [len(kept), sum(len(r["text"].encode()) for r in kept)]
    assert table["exact", "all"][0] == 30 + 3  # planted copies, and `extra`'s copies of `web`
    assert table["quality", "extra"][0] == 2  # the two repetitive documents
    assert table["decontaminate", "web"][0] == 12  # the planted held-out problems
    read = table["read", "all"][0]
    removed = sum(table[s.step, "all"][0] for s in meta.steps)
    # 120 originals, 90 copies, 13 documents holding problems; 10 documents of `extra`
    assert read == removed + table["kept", "all"][0] == 120 + 90 + 13 + 10
    assert "task arithmetic" in section["note"]


def test_curate_report_cluster_histogram_is_the_near_removals(run: dict[str, Any]) -> None:
    export = run["export"]
    section = sections(export)[curate_report.CLUSTERS_TITLE]
    members = Counter(r["kept_id"] for r in read_shards(export / "removed" / "near"))
    expected = Counter(count + 1 for count in members.values())  # the kept document too
    assert {row[0]: row[1] for row in section["rows"]} == dict(expected)
    assert sum(row[2] for row in section["rows"]) == len(members) + sum(members.values())
    assert sum(expected.values()) >= 30  # the planted near pairs
    assert section["images"] == [curate_report.CLUSTERS_PNG]
    assert (export / curate_report.CLUSTERS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curate_report_examples_cover_every_reason(run: dict[str, Any]) -> None:
    export = run["export"]
    rows = sections(export)[curate_report.EXAMPLES_TITLE]["rows"]
    columns = curate_report.EXAMPLE_COLUMNS
    shown = [dict(zip(columns, row, strict=True)) for row in rows]
    for step in ("exact", "near", "quality", "decontaminate"):
        removed = {r["id"]: r for r in read_shards(export / "removed" / step)}
        grouped = step == "quality"  # the other steps' reasons name documents: one group
        reasons = Counter(r["reason"] if grouped else step for r in removed.values())
        mine = [row for row in shown if row["step"] == step]
        if grouped:
            assert {row["reason"] for row in mine} == set(reasons) and len(reasons) == 2
        assert len(mine) == sum(min(3, count) for count in reasons.values())
        for row in mine:
            record = removed[row["id"]]
            text = record["text"]
            if step == "decontaminate":  # around the planted problem, at the end of the text
                assert row["text"].startswith("[...] ") and text.endswith(" end.")
                assert text.endswith(row["text"].removeprefix("[...] "))
            else:
                assert row["text"] == text[:240] + (" [...]" * (len(text) > 240))
            assert row["kept id"] == record.get("kept_id") and row["source"] == record["source"]
        assert [row["id"] for row in mine] == sorted(row["id"] for row in mine)


def test_curate_metrics_row_and_wandb_payload_hold_the_summary(run: dict[str, Any]) -> None:
    stage_dir, export = run["stage_dir"], run["export"]
    from pipeline.cli import main

    assert main(["run", str(run["path"]), "--force"]) == 0  # a rerun replaces the row
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((stage_dir / "stage.json").read_text())["summary"]
    assert len(rows) == 1 and rows[0]["step"] == 0
    assert {k: rows[0][k] for k in summary} == summary
    assert summary["removed_documents/quality/extra"] == 2
    found = sections(export)
    payload = curate_report.wandb_payload(list(found.values()), export)
    counts = payload["curate/counts"]
    assert counts.columns == curate_report.COUNT_COLUMNS
    assert counts.data == found[curate_report.COUNTS_TITLE]["rows"]
    histogram = payload["curate/near_clusters_sizes"]
    clusters = sum(row[1] for row in found[curate_report.CLUSTERS_TITLE]["rows"])
    assert sum(histogram.histogram) == clusters
    assert "curate/near_clusters_plot" in payload and "curate/examples" in payload


def test_curate_sections_reach_the_run_report(run: dict[str, Any]) -> None:
    from pipeline.cli import main

    run_dir = run["stage_dir"].parent
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    for title in (curate_report.COUNTS_TITLE, curate_report.CLUSTERS_TITLE):
        assert f"<h2>curate: {title}</h2>" in page
    assert (run_dir / "report" / f"curate_{curate_report.CLUSTERS_PNG}").is_file()
