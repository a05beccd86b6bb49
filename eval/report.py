"""Run report: one self-contained HTML page, with PNG training curves beside it, for a run dir.

Written by the `report` stage and by `pipeline report RUN_DIR`. It only reads what stages left in
the run directory (manifests, metrics.jsonl, eval exports) and never writes a manifest; the
report stage names itself as the page being written rather than as a stage still running.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from eval.task_plots import guard_runs, overoptimisation_section, plot_rl_curves
from pipeline.engine.config import StageConfig, read_yaml, validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.dag import Graph
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.inputs import StageSpec
from pipeline.engine.manifest import StageRecord, atomic_write_text, stage_record
from pipeline.engine.rundir import EXPORT_DIR, MANIFEST_FILE, RECIPE_FILE
from pipeline.engine.sections import SECTIONS_FILE
from pipeline.engine.tracking import read_metrics

REPORT_DIR = "report"
EVAL_COLUMNS = ("val_loss", "perplexity", "bits_per_byte", "unigram_loss", "loss_vs_unigram")
# Headline metrics of the masked (bert) and span-corruption (t5) families; shown when present.
FAMILY_COLUMNS = ("mlm_loss", "masked_token_accuracy", "span_loss", "span_accuracy")
# Task metrics (held-out arithmetic, lm-eval tasks); shown when present.
TASK_COLUMNS = ("task_accuracy", "task_accuracy_low", "task_accuracy_high",
                "task_macro_accuracy", "task_format_rate")  # fmt: skip
STYLE = """
body { font-family: system-ui, sans-serif; color: #222; margin: 2em auto; padding: 0 1em;
       max-width: 70em; }
table { border-collapse: collapse; }
.wide { overflow-x: auto; margin: 1em 0; }
code { overflow-wrap: anywhere; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.done { color: #176f2c; } .failed { color: #b00020; } .running { color: #a15c00; }
.pending, .not-started { color: #777; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
pre b { color: #1a4f8b; }
img { max-width: 100%; }
"""


class Config(StageConfig):
    """Write the run's HTML report: stage table, loss curves, eval results and samples."""

    kind: Literal["report"] = "report"
    title: str | None = Field(None, description="page title; default: the recipe name")


def run(ctx: StageContext) -> None:
    """Write index.html and its PNGs into this stage's directory (RUN_DIR/report by convention)."""
    config = ctx.config
    assert isinstance(config, Config)
    path = write_report(ctx.run_dir, config.title, out_dir=ctx.stage_dir, writer=ctx.name)
    ctx.log.info("report: %s", path)


def write_report(
    run_dir: Path, title: str | None = None, out_dir: Path | None = None, writer: str | None = None
) -> Path:
    """Write `out_dir/index.html` (default RUN_DIR/report) and its PNGs; return its path.
    `writer` is the report stage writing it, shown as this page rather than as still running."""
    out_dir = out_dir or run_dir / REPORT_DIR
    recipe = read_yaml(run_dir / RECIPE_FILE) if (run_dir / RECIPE_FILE).is_file() else {}
    recipe_stages = recipe.get("stages") or {}
    names = stage_order(recipe) + sorted(
        p.parent.name
        for p in run_dir.glob(f"*/{MANIFEST_FILE}")
        if p.parent.name not in recipe_stages
    )
    if not names:
        raise PipelineError(
            f"{run_dir}: not a run directory (no {RECIPE_FILE} and no */{MANIFEST_FILE}); "
            f"pass the run_dir of a recipe, e.g. runs/demo"
        )
    manifests = {name: stage_record(run_dir / name) for name in names}
    kinds = {
        name: manifests[name].kind or (recipe_stages.get(name) or {}).get("kind", "?")
        for name in names
    }
    title = title or recipe.get("name") or run_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    curves, shown = training_curves(run_dir, names, recipe_stages, out_dir)
    # Gold and proxy against sqrt(KL) of every stage with guard measurements, compared in one table.
    guarded = guard_runs(run_dir, names, recipe_stages, manifests)
    over = overoptimisation_section(out_dir, guarded) if guarded else None
    body = [
        f"<h1>{escape(title)}</h1>",
        _header(run_dir, manifests, writer),
        "<h2>Stages</h2>",
        stage_table(manifests, kinds, writer),
        curves,
        _section_html(f"RL: {over['title']}", over, [(i, i) for i in over["images"]])
        if over
        else "",
        eval_results(run_dir, manifests),
        stage_sections(run_dir, manifests, out_dir, shown),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    return path


def stage_order(recipe: dict[str, Any]) -> list[str]:
    """The recipe's stages in the order they run (dependencies first); a recipe that no longer
    validates (written by an older version) in its listed order."""
    try:
        return Graph(validate_recipe(recipe, source=RECIPE_FILE)).order
    except RecipeError:
        return list(recipe.get("stages") or {})


def _header(run_dir: Path, manifests: dict[str, StageRecord], writer: str | None) -> str:
    """When and from where the report was written, and which other stages were still running."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [f"<p>Run directory <code>{escape(str(run_dir))}</code>, report written {now}.</p>"]
    running = [n for n, m in manifests.items() if m.status == "running" and n != writer]
    if running:
        lines.append(
            f"<p>Still running when this report was written: {escape(', '.join(running))}.</p>"
        )
    return "\n".join(lines)


def stage_table(
    manifests: dict[str, StageRecord], kinds: dict[str, str], writer: str | None = None
) -> str:
    """HTML table: stage, kind, status, duration, headline metric and attempts."""
    rows = [
        "<tr><th>stage</th><th>kind</th><th>status</th><th>duration</th>"
        "<th>headline</th><th>value</th><th>attempts</th></tr>",
    ]
    for name, manifest in manifests.items():
        status = manifest.status or "not started"
        css = status.replace(" ", "-")
        status = "writing this page" if name == writer else status
        error = f"<br><small>{escape(manifest.error)}</small>" if manifest.error else ""
        headline, value = manifest.headline, manifest.headline_value
        rows.append(
            f"<tr><td>{escape(name)}</td><td>{escape(kinds[name])}</td>"
            f'<td class="{escape(css)}">{escape(status)}{error}</td>'
            f'<td class="num">{escape(_duration(manifest))}</td>'
            f'<td>{escape(headline or "-")}</td><td class="num">{escape(_fmt(value))}</td>'
            f'<td class="num">{manifest.attempts}</td></tr>'
        )
    return _table(rows)


def training_curves(
    run_dir: Path, names: list[str], recipe_stages: dict[str, Any], out_dir: Path
) -> tuple[str, set[str]]:
    """A PNG per stage that logged train/loss and the HTML showing them, with the PNG names.

    A stage that logs a sampled reward (GRPO, RLOO) gets its reward and held-out accuracy
    instead: its loss is a policy-gradient surrogate around 0 that says nothing about progress.
    """
    parts, shown = [], set()
    for name in names:
        rows = read_metrics(run_dir / name)
        if not any("train/loss" in row for row in rows):
            continue
        if any("train/reward" in row for row in rows):
            algorithm = str((recipe_stages.get(name) or {}).get("algorithm", name)).upper()
            png = out_dir / f"{name}_rl_curves.png"
            plot_rl_curves(rows, png, algorithm)
            alt = f"reward and held-out accuracy of {name}"
        else:
            png = out_dir / f"loss_{name}.png"
            plot_losses(rows, png, title=name)
            alt = f"loss of {name}"
        shown.add(png.name)
        parts.append(f'<h3>{escape(name)}</h3>\n<img src="{escape(png.name)}" alt="{escape(alt)}">')
        parts.extend(f"<p>{escape(line)}</p>" for line in training_events(rows))
    return ("<h2>Training curves</h2>\n" + "\n".join(parts) if parts else ""), shown


def training_events(rows: list[dict[str, Any]]) -> list[str]:
    """One line per rollback, and the count of skipped non-finite steps, from metrics rows."""
    lines = []
    for row in rows:
        if "event/rollback" in row:
            back = int(row["rollback/to_step"])
            where = f"rolled back to step {back}" if back >= 0 else "no checkpoint to roll back to"
            lines.append(
                f"Loss spike at step {row['step']} (loss {row['rollback/loss']:.4g} against a "
                f"running mean of {row['rollback/window_mean']:.4g}): {where}, batches of steps "
                f"{int(row['rollback/skipped_from'])}..{int(row['rollback/skipped_to'])} skipped."
            )
    skipped = [row["step"] for row in rows if "train/skipped_step" in row]
    if skipped:
        lines.append(
            f"{len(skipped)} step(s) skipped for a non-finite loss or gradient norm: "
            + ", ".join(str(step) for step in skipped)
        )
    return lines


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Save train/loss and val/loss (nats/token) against step as a PNG, with the learning-rate
    schedule on a second axis and every rollback (dashed) and skipped step (dotted) marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = _series(rows, key)
        if steps:
            axes.plot(steps, values, style, label=key, markersize=4)
    for key, line, label in (("event/rollback", "--", "rollback"), ("train/skipped_step", ":",
                                                                    "skipped step")):  # fmt: skip
        for i, (step, _) in enumerate(zip(*_series(rows, key), strict=True)):
            axes.axvline(step, color="tab:red", linestyle=line, label=label if i == 0 else None)
    steps, lrs = _series(rows, "train/lr")
    if steps:
        lr_axes = axes.twinx()
        lr_axes.plot(steps, lrs, color="tab:gray", linewidth=1, label="train/lr")
        lr_axes.set_ylabel("learning rate", color="tab:gray")
        lr_axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png")


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows that hold it."""
    points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def eval_results(run_dir: Path, manifests: dict[str, StageRecord]) -> str:
    """Metrics table and greedy samples of every finished stage that exported eval.json."""
    scored: list[tuple[str, str, dict[str, Any]]] = []
    samples: list[str] = []
    for name, manifest in manifests.items():
        export = run_dir / name / EXPORT_DIR
        if manifest.status != "done" or not (export / "eval.json").is_file():
            continue
        results = json.loads((export / "eval.json").read_text(encoding="utf-8"))
        scored += [(name, model, m) for model, m in results.get("models", {}).items()]
        samples += [
            f"<h3>{escape(name)} / {escape(s.get('model', '?'))}</h3>\n"
            f"<pre><b>{escape(s.get('prompt', ''))}</b>{escape(s.get('completion', ''))}</pre>"
            for s in _read_jsonl(export / "samples.jsonl")
        ]
    if not scored:
        return ""
    all_columns = (*EVAL_COLUMNS, *FAMILY_COLUMNS, *TASK_COLUMNS)
    columns = [c for c in all_columns if any(c in metrics for _, _, metrics in scored)]
    columns += sorted(
        {k for _, _, m in scored for k in m if k.startswith("lm_eval/") and "sample_len" not in k}
    )
    header = "".join(f"<th>{c}</th>" for c in ("eval stage", "model", *columns))
    rows = [
        f"<tr><td>{escape(name)}</td><td>{escape(model)}</td>"
        + "".join(f'<td class="num">{escape(_fmt(metrics.get(c)))}</td>' for c in columns)
        + "</tr>"
        for name, model, metrics in scored
    ]
    parts = [
        "<h2>Evaluation</h2>",
        "<p>Losses in nats/token on validation tokens; unigram_loss is an add-one smoothed unigram "
        "model of the training tokens, loss_vs_unigram = val_loss / unigram_loss (lower is better); "
        "mlm_loss and span_loss are the masked-LM and span-corruption objectives on the same windows; "
        "task_accuracy is greedy exact match on held-out problems of the verifiable task (with its "
        "95% Wilson interval), task_macro_accuracy its mean over subtasks and task_format_rate "
        "the share of bare answers.</p>",
        _table([f"<tr>{header}</tr>", *rows]),
    ]
    if samples:
        parts += [
            "<h2>Greedy samples</h2>",
            "<p>Prompt in bold, completion after it.</p>",
            *samples,
        ]
    return "\n".join(parts)


def stage_sections(
    run_dir: Path, manifests: dict[str, StageRecord], out_dir: Path, shown: set[str]
) -> str:
    """HTML of the report.json sections of every finished stage (tables, then images); an
    image already on the page (`shown`, e.g. RL curves among the training curves) not again."""
    parts = []
    for name, manifest in manifests.items():
        export = run_dir / name / EXPORT_DIR
        path = export / SECTIONS_FILE
        if manifest.status != "done" or not path.is_file():
            continue
        for section in json.loads(path.read_text(encoding="utf-8")).get("sections", []):
            images = []
            for image in section.get("images", []):
                target = f"{name}_{Path(image).name}"
                if target not in shown:
                    shutil.copyfile(export / image, out_dir / target)
                    images.append((target, str(image)))
            parts.append(_section_html(f"{name}: {section['title']}", section, images))
    return "\n".join(parts)


def _section_html(heading: str, section: dict[str, Any], images: list[tuple[str, str]]) -> str:
    """A section as HTML: heading, note, table, then images given as (src, alt)."""
    parts = [f"<h2>{escape(heading)}</h2>"]
    if section.get("note"):
        parts.append(f"<p>{escape(str(section['note']))}</p>")
    if section.get("rows"):
        header = "".join(f"<th>{escape(str(c))}</th>" for c in section.get("columns", []))
        rows = ["<tr>" + "".join(map(_cell, row)) + "</tr>" for row in section["rows"]]
        parts.append(_table([f"<tr>{header}</tr>", *rows]))
    parts += [f'<img src="{escape(src)}" alt="{escape(alt)}">' for src, alt in images]
    return "\n".join(parts)


def _table(rows: list[str]) -> str:
    """Table rows in a box that scrolls sideways when the table is wider than the page."""
    return '<div class="wide"><table>\n' + "\n".join(rows) + "\n</table></div>"


def _cell(value: Any) -> str:
    """A table cell: numbers right-aligned and formatted, anything else as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{escape(_fmt(value))}</td>'
    return f"<td>{escape(_fmt(value))}</td>"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; missing file: none."""
    if not path.is_file():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _duration(manifest: StageRecord) -> str:
    """Finished duration, or time so far for a running stage."""
    if manifest.duration_s is not None:
        return _fmt_seconds(manifest.duration_s)
    if manifest.status == "running" and manifest.started_at:
        started = datetime.fromisoformat(manifest.started_at)
        return _fmt_seconds((datetime.now(UTC) - started).total_seconds()) + " so far"
    return "-"


def _fmt_seconds(seconds: float) -> str:
    """Seconds as `12.3s`, `4m 05s` or `2h 03m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _fmt(value: Any) -> str:
    """A metric value for a table cell."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SPEC = StageSpec(Config, run, output="report")
