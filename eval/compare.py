"""Comparison stage: one table row per upstream stage, columns taken from what those stages recorded.

Generic over stage kinds: a column names a summary metric of the stage (`val_loss`,
`non_embedding_params`, `tokens`), else a field of its manifest (`duration_s`, the wall time of
its last attempt), else a key of its metrics.jsonl (`train/tokens_per_second`), averaged over the
logged steps. Rows of model stages also say which loss their family trains with, because a masked
LM's or a span-corruption loss is not the same quantity as a causal LM's next-token loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field

from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, OutputType, PlanView, StageSpec
from pipeline.engine.kinds import KINDS
from pipeline.engine.manifest import atomic_write_json, read_manifest
from pipeline.engine.schema_errors import suggest
from pipeline.engine.tracking import read_metrics
from pipeline.models.families import FAMILIES, ModelConfig

DEFAULT_COLUMNS = [
    "val_loss",
    "params",
    "non_embedding_params",
    "active_non_embedding_params",
    "tokens",
    "train/tokens_per_second",
    "duration_s",
]
TABLE_FILE = "comparison.json"
CURVES_PNG = "train_loss.png"
# The direct `after` stages, of any kind: those of the stage's `kinds` are its rows.
AFTER_INPUT = Input("after", get_args(OutputType), field="after.*", required=False, nearest=False)


class Config(StageConfig):
    """Tabulate the summaries of upstream stages side by side (and plot their training losses)."""

    kind: Literal["compare"] = "compare"
    kinds: list[str] = Field(
        ["pretrain"], description="kinds of the direct `after` stages that become rows"
    )
    columns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COLUMNS),
        description="summary keys, manifest fields (duration_s) or metrics.jsonl keys (mean)",
    )
    curve: str | None = Field(
        "train/loss", description="metrics.jsonl key plotted against tokens seen; None: no plot"
    )
    title: str = Field("Comparison", description="report section title")


@dataclass(frozen=True)
class Row:
    """What one finished upstream stage left behind."""

    stage: str
    kind: str
    config: StageConfig
    manifest: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary") or {}


def row_stages(after: Mapping[str, str], kinds: list[str]) -> list[str]:
    """The stages that become rows: those of `after` (name -> kind, in order) of `kinds`."""
    return [name for name, kind in after.items() if kind in kinds]


def rows_problem(view: PlanView, fewest: int, what: str) -> str | None:
    """Why the stage has not `fewest` rows to tabulate (a misspelt kind, no stage of its kinds in
    `after`), or None: what `upstream_rows` would find only when the stage runs."""
    cfg = view.config
    where = f"stages.{view.name}"
    for kind in cfg.kinds:
        if kind not in KINDS:
            return f"{where}.kinds: no stage kind {kind!r}{suggest(kind, KINDS)}; use {', '.join(KINDS)}"
    after = {str(r.stage): str(r.kind) for r in view.inputs.get("after", [])}
    rows = row_stages(after, cfg.kinds)
    if len(rows) >= fewest:
        return None
    found = f"only {rows[0]}" if rows else "none"
    return (
        f"{where}.after: {what} needs {fewest} or more stages of kind {'/'.join(cfg.kinds)} "
        f"in its `after:`, found {found}; list them there"
    )


def upstream_rows(ctx: StageContext, kinds: list[str]) -> list[Row]:
    """The direct upstream stages of `kinds`, in `after` order; each must be done."""
    rows = []
    found = {str(up.stage): up for up in ctx.inputs("after")}  # raises unless each is done
    after = {name: str(up.kind) for name, up in found.items()}
    for name in row_stages(after, kinds):
        up = found[name]
        manifest, metrics = read_manifest(up.stage_dir), read_metrics(up.stage_dir)
        rows.append(Row(name, str(up.kind), up.config, manifest, metrics))
    if not rows:
        raise PipelineError(
            f"stages.{ctx.name}.after: no stage of kind {'/'.join(kinds)}; "
            f"list the stages to compare in its `after:`"
        )
    return rows


def column_value(row: Row, key: str) -> Any:
    """A summary metric, else a manifest field, else the mean of a logged metric; None if absent."""
    if key in row.summary:
        return row.summary[key]
    if key in row.manifest:
        return row.manifest[key]
    values = [r[key] for r in row.metrics if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def loss_meaning(config: StageConfig) -> str:
    """What a model stage's loss measures (its family's objective), in nats per scored token."""
    model = getattr(config, "model", None)
    if not isinstance(model, ModelConfig):
        return "-"
    return FAMILIES[model.arch].loss_meaning.format(**model.model_dump())


def comparison_table(rows: list[Row], columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    """(header, cells): stage, arch, what the loss is, then the configured columns."""
    header = ["stage", "arch", "loss is", *columns]
    cells = [
        [
            row.stage,
            getattr(getattr(row.config, "model", None), "arch", row.kind),
            loss_meaning(row.config),
            *(column_value(row, key) for key in columns),
        ]
        for row in rows
    ]
    return header, cells


def plot_curves(rows: list[Row], key: str, path: Path) -> bool:
    """Plot `key` against tokens seen for every row that logged it; False when none did."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    plotted = False
    for row in rows:
        points = [(r.get("train/tokens", r["step"]), r[key]) for r in row.metrics if key in r]
        if points:
            tokens, values = zip(*points, strict=True)
            axes.plot(tokens, values, label=row.stage)
            plotted = True
    if not plotted:
        return False
    axes.set_xlabel("tokens seen")
    axes.set_ylabel(f"{key} (nats/token)")
    axes.set_title("each model under its own objective", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return True


def run(ctx: StageContext) -> None:
    """Write comparison.json and a report section (table + curve plot) for the upstream stages."""
    from pipeline.engine.sections import write_sections

    config = ctx.config
    assert isinstance(config, Config)
    rows = upstream_rows(ctx, config.kinds)
    header, cells = comparison_table(rows, config.columns)
    atomic_write_json(
        ctx.export_dir / TABLE_FILE, {"columns": header, "rows": cells, "title": config.title}
    )
    images = []
    if config.curve and plot_curves(rows, config.curve, ctx.export_dir / CURVES_PNG):
        images.append(CURVES_PNG)
    note = (
        "One row per upstream stage. Losses are in nats per scored token on held-out windows, "
        "each under its own family's objective (column 'loss is'), so they compare across rows "
        "only within a family. Non-embedding parameters leave out embedding tables and the "
        "vocabulary projection; active counts MoE experts at top-k/E. duration_s is the wall "
        "time of the stage's last attempt; train/tokens_per_second the mean over logged steps."
    )
    write_sections(
        ctx.export_dir,
        [{"title": config.title, "note": note, "columns": header, "rows": cells, "images": images}],
    )
    numeric = {
        f"{row[0]}/{key}": value
        for row in cells
        for key, value in zip(header, row, strict=True)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
    ctx.write_summary(
        numeric, note=f"compared {len(rows)} stages: {', '.join(r.stage for r in rows)}"
    )


SPEC = StageSpec(
    Config,
    run,
    output="table",
    inputs=(AFTER_INPUT,),
    plan_check=lambda view: [p for p in [rows_problem(view, 1, "a comparison")] if p],
)
