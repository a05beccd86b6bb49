"""Run report: stage table, loss-curve PNGs, eval results and escaped samples from a fake run dir."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from eval import report
from pipeline.engine.config import Recipe, TrackingConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import write_manifest

HOSTILE_SAMPLE = "</pre><script>alert(1)</script>"


def make_run_dir(root: Path) -> Path:
    """A run with a done pretrain stage (with loss curves), a done eval stage and a running report."""
    run_dir = root / "demo"
    stages = {
        "pretrain": {"kind": "pretrain"},
        "eval": {"kind": "eval", "after": ["pretrain"]},
        "report": {"kind": "report", "after": ["eval"]},
    }
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": "demo", "stages": stages}))
    write_manifest(
        run_dir / "pretrain",
        {
            "stage": "pretrain",
            "kind": "pretrain",
            "status": "done",
            "attempts": 2,
            "duration_s": 125.0,
            "summary": {"val_loss": 2.34567, "train_loss": 2.1},
            "headline": "val_loss",
        },
    )
    rows = [{"step": s, "time": 0.0, "train/loss": 5.0 / (1 + s)} for s in range(1, 21)]
    rows += [{"step": s, "time": 0.0, "val/loss": 5.5 / (1 + s)} for s in (10, 20)]
    (run_dir / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_manifest(
        run_dir / "eval",
        {
            "stage": "eval",
            "kind": "eval",
            "status": "done",
            "attempts": 1,
            "duration_s": 3.5,
            "summary": {"val_loss": 2.5},
            "headline": "val_loss",
        },
    )
    metrics = {
        "val_loss": 2.5,
        "perplexity": 12.18,
        "bits_per_byte": 1.234,
        "unigram_loss": 5.75,
        "loss_vs_unigram": 0.4348,
    }
    (run_dir / "eval" / "export").mkdir()
    (run_dir / "eval" / "export" / "eval.json").write_text(
        json.dumps({"models": {"pretrain": metrics}})
    )
    sample = {"model": "pretrain", "prompt": "class <Tag>", "completion": HOSTILE_SAMPLE}
    (run_dir / "eval" / "export" / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    write_manifest(
        run_dir / "report",
        {
            "stage": "report",
            "kind": "report",
            "status": "running",
            "attempts": 1,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": None,
        },
    )
    return run_dir


def test_report_shows_stages_curves_eval_and_escaped_samples(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)

    path = report.write_report(run_dir, title="Demo <run>")

    assert path == run_dir / "report" / "index.html"
    page = path.read_text(encoding="utf-8")
    for name in ("pretrain", "eval", "report"):
        assert f"<td>{name}</td>" in page
    assert "2.346" in page and "2m 05s" in page  # headline value and duration of pretrain
    assert "1.234" in page and "0.4348" in page  # eval table
    assert "so far" in page and "Still running when this report was written: report" in page
    assert '<img src="loss_pretrain.png"' in page
    png = run_dir / "report" / "loss_pretrain.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert not (run_dir / "report" / "loss_eval.png").exists()
    assert "Demo &lt;run&gt;" in page
    assert "class &lt;Tag&gt;" in page and "&lt;/pre&gt;&lt;script&gt;" in page
    assert "<script>" not in page and "<Tag>" not in page


def test_report_stage_leaves_its_manifest_alone(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    manifest_before = (run_dir / "report" / "stage.json").read_bytes()
    recipe = Recipe(
        name="demo",
        run_dir=str(run_dir),
        tracking=TrackingConfig(mode="disabled"),
        stages={"report": report.Config(title="From the stage")},
    )

    report.run(StageContext(run_dir=run_dir, name="report", recipe=recipe))

    assert (run_dir / "report" / "stage.json").read_bytes() == manifest_before
    assert "From the stage" in (run_dir / "report" / "index.html").read_text(encoding="utf-8")


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a run directory"):
        report.write_report(tmp_path)


def test_report_shows_stage_sections_with_tables_and_images(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    export = run_dir / "pretrain" / "export"
    export.mkdir()
    (export / "grid.png").write_bytes(b"\x89PNG fake")
    report.write_sections(
        export,
        [
            {
                "title": "Comparison <table>",
                "note": "lower is better",
                "columns": ["model", "mse"],
                "rows": [["ridge", 0.123456], ["lasso", 2]],
                "images": ["grid.png"],
            }
        ],
    )
    with pytest.raises(ValueError, match="no image"):
        report.write_sections(export, [{"title": "x", "images": ["missing.png"]}])

    page = report.write_report(run_dir).read_text(encoding="utf-8")

    assert "<h2>pretrain: Comparison &lt;table&gt;</h2>" in page
    assert '<td>ridge</td><td class="num">0.1235</td>' in page
    assert '<img src="pretrain_grid.png"' in page
    assert (run_dir / "report" / "pretrain_grid.png").read_bytes() == b"\x89PNG fake"
