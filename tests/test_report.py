"""Run report: stage table, training-curve PNGs, eval results, escaped samples and the RL
over-optimisation picture, from fake run dirs."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from eval import report
from eval.task_plots import GuardRun
from pipeline.engine import sections
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


# Gold = 0.5 + d (0.3 - 0.2 log d) at these d = sqrt(KL): Gao et al.'s RL form, peak at d = e^0.5.
ALPHA, BETA = 0.3, 0.2
SQRT_KL = [0.0, 0.5, 1.0, 1.8, 2.6]
GOLD = [0.5 + d * (ALPHA - BETA * math.log(d)) if d else 0.5 for d in SQRT_KL]


def add_rl_stage(
    run_dir: Path, name: str, sqrt_kl: list[float], gold: list[float], best_step: int, **cfg: object
) -> None:
    """A done GRPO stage with guard measurements every 10 steps and a policy-gradient loss."""
    write_manifest(
        run_dir / name,
        {"stage": name, "kind": "rlhf", "status": "done", "attempts": 1, "duration_s": 60.0,
         "summary": {"guard_best_step": best_step, "guard_best_gold": max(gold)}},
    )  # fmt: skip
    rows = []
    for i, (d, g) in enumerate(zip(sqrt_kl, gold, strict=True)):
        guard = {"guard/gold": g, "guard/kl": d * d, "guard/sqrt_kl": d}
        if i:
            guard["guard/proxy"] = 1.0 + i
            rows.append(
                {"step": 10 * i - 5, "train/loss": 1e-4 * (-1) ** i, "train/reward": 1.0 + i}
            )
        rows.append({"step": 10 * i, **guard})
    (run_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["stages"][name] = {"kind": "rlhf", "after": ["pretrain"], "rewards": ["format"], **cfg}
    recipe["stages"][name]["guard"] = {"every": 10}
    recipe["stages"]["eval"]["after"] = sorted({*recipe["stages"]["eval"]["after"], name})
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def make_rl_run_dir(root: Path) -> Path:
    """`make_run_dir` plus two guarded GRPO stages listed after the report (a single reward
    model whose gold turns down, an ensemble whose gold keeps rising) and a wide eval table."""
    run_dir = make_run_dir(root)
    add_rl_stage(run_dir, "grpo", SQRT_KL, GOLD, best_step=30, reward_model=["pretrain"])
    add_rl_stage(run_dir, "grpo_ensemble", [0.0, 0.3, 0.6], [0.5, 0.6, 0.7], best_step=20,
                 reward_model=["pretrain", "eval"], ensemble="min")  # fmt: skip
    scored = json.loads((run_dir / "eval" / "export" / "eval.json").read_text())
    scored["models"]["pretrain"] |= {f"lm_eval/task_{i}/acc,none": 0.25 for i in range(30)}
    (run_dir / "eval" / "export" / "eval.json").write_text(json.dumps(scored))
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
    sections.write_sections(
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
        sections.write_sections(export, [{"title": "x", "images": ["missing.png"]}])

    page = report.write_report(run_dir).read_text(encoding="utf-8")

    assert "<h2>pretrain: Comparison &lt;table&gt;</h2>" in page
    assert '<td>ridge</td><td class="num">0.1235</td>' in page
    assert '<img src="pretrain_grid.png"' in page
    assert (run_dir / "report" / "pretrain_grid.png").read_bytes() == b"\x89PNG fake"


def test_report_orders_stages_as_they_run_and_does_not_list_itself_as_running(
    tmp_path: Path,
) -> None:
    run_dir = make_rl_run_dir(tmp_path)

    page = report.write_report(run_dir, writer="report").read_text(encoding="utf-8")

    stage_rows = [line for line in page.splitlines() if line.startswith("<tr><td>")][:5]
    assert [row[8 : row.index("</td>")] for row in stage_rows] == [
        "pretrain", "grpo", "grpo_ensemble", "eval", "report"
    ]  # fmt: skip
    assert "writing this page" in page and "Still running" not in page


def test_report_shows_reward_curves_instead_of_a_policy_gradient_loss(tmp_path: Path) -> None:
    run_dir = make_rl_run_dir(tmp_path)

    page = report.write_report(run_dir).read_text(encoding="utf-8")

    curves = page[page.index("<h2>Training curves</h2>") : page.index("<h2>RL: ")]
    assert '<img src="grpo_rl_curves.png"' in curves and "loss_pretrain.png" in curves
    assert not (run_dir / "report" / "loss_grpo.png").exists()
    assert (run_dir / "report" / "grpo_rl_curves.png").stat().st_size > 5000
    assert '<div class="wide"><table>' in page and "<table>" not in page.replace(
        '<div class="wide"><table>', ""
    )  # every table scrolls inside its box


def test_overoptimisation_fit_recovers_gao_et_al_coefficients() -> None:
    run = GuardRun("grpo", "rm", [0, 10, 20, 30, 40], GOLD, SQRT_KL, [None] * 5, 30)

    alpha, beta = run.fit() or (None, None)

    assert alpha == pytest.approx(ALPHA, abs=1e-9) and beta == pytest.approx(BETA, abs=1e-9)
    few = GuardRun("grpo", "rm", [0, 10], GOLD[:2], SQRT_KL[:2], [None] * 2, 10)
    assert few.fit() is None  # one point beyond the start fixes no curve


def test_report_compares_guarded_rl_stages_in_one_table(tmp_path: Path) -> None:
    run_dir = make_rl_run_dir(tmp_path)

    page = report.write_report(run_dir).read_text(encoding="utf-8")

    section = page[page.index("<h2>RL: reward over-optimisation</h2>") : page.index("<h2>Eval")]
    rows = [line for line in section.splitlines() if line.startswith("<tr><td>")]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    peak = math.exp(ALPHA / BETA - 1)
    assert cells[0][:8] == [
        "grpo", "reward model pretrain + format", "30", f"{GOLD[3]:.4g}", f"{1.8**2:.4g}", "40",
        f"{GOLD[4]:.4g}", f"{GOLD[4] - GOLD[3]:.4g}",
    ]  # fmt: skip
    assert [float(c) for c in cells[0][8:]] == pytest.approx([ALPHA, BETA, peak], rel=1e-3)
    assert cells[1][:4] == [
        "grpo_ensemble",
        "ensemble (min) of pretrain, eval + format",
        "20",
        "0.7",
    ]
    for name in ("grpo", "grpo_ensemble"):
        png = run_dir / "report" / f"overoptimisation_{name}.png"
        assert f'<img src="{png.name}"' in section and png.stat().st_size > 5000
