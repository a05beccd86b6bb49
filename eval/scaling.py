"""Scaling-law stage: fit L(N) = a * N^-alpha + c to the final losses of a sweep of model sizes.

N is the non-embedding parameter count (Kaplan et al. 2020) that the pretrain stages record, L
their held-out loss after the same tokens. The fit minimises squared error in log L (each point
weighs the same whatever its loss) within bounds that keep it physical (a > 0, 0 <= alpha <= 4,
0 <= c < min L), from several starting points. With fewer than four points, or when no start
converges, it falls back to a pure power law (c = 0), a straight line in log-log space.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from eval.compare import AFTER_INPUT, Row, column_value, rows_problem, upstream_rows
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import StageSpec
from pipeline.engine.manifest import atomic_write_json

FIT_PNG = "scaling.png"
FULL_FORM = "a * N^-alpha + c"
PURE_FORM = "a * N^-alpha (c = 0)"
MAX_ALPHA = 4.0


class Config(StageConfig):
    """Fit a power law in model size to the losses of upstream stages (a sweep)."""

    kind: Literal["scaling"] = "scaling"
    kinds: list[str] = Field(
        ["pretrain"], description="kinds of the direct `after` stages that are points"
    )
    params_key: str = Field(
        "non_embedding_params", description="summary key giving N (e.g. params for all weights)"
    )
    loss_key: str = Field("val_loss", description="summary key giving L (nats/token)")


@dataclass(frozen=True)
class PowerLawFit:
    """L(N) = a * N^-alpha + c, how well it fits (RMS error of log L) and alpha's standard error."""

    a: float
    alpha: float
    c: float
    rmse_log: float
    form: str
    alpha_stderr: float | None = None  # from the fit's covariance; None without spare points

    def predict(self, num_params: np.ndarray | Sequence[float]) -> np.ndarray:
        return self.a * np.asarray(num_params, dtype=float) ** -self.alpha + self.c


def fit_power_law(num_params: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of log L = log(a * N^-alpha + c); raises ValueError on unusable points."""
    n, loss = np.asarray(num_params, dtype=float), np.asarray(losses, dtype=float)
    if n.shape != loss.shape or len(np.unique(n)) < 2:
        raise ValueError(f"need losses at two or more distinct sizes, got N={n.tolist()}")
    if not (np.all(np.isfinite(loss)) and np.all(loss > 0) and np.all(n > 0)):
        raise ValueError(f"sizes and losses must be positive and finite, got L={loss.tolist()}")
    x, y = np.log(n), np.log(loss)
    best = _fit_pure(x, y)
    if len(n) >= 4:
        for fraction in (0.0, 0.3, 0.6, 0.8, 0.95):
            fit = _fit_full(x, y, c0=fraction * loss.min())
            if fit is not None and fit.rmse_log < best.rmse_log - 1e-12:
                best = fit
    return best


def _fit_pure(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """c = 0: a straight line log L = log a - alpha log N."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    rmse = float(np.sqrt(np.mean(residual**2)))
    spare = len(x) - 2  # degrees of freedom left for the noise estimate
    stderr = math.sqrt(np.sum(residual**2) / spare / np.sum((x - x.mean()) ** 2)) if spare else None
    return PowerLawFit(math.exp(intercept), -float(slope), 0.0, rmse, PURE_FORM, stderr)


def _fit_full(x: np.ndarray, y: np.ndarray, c0: float) -> PowerLawFit | None:
    """Bounded fit of all three parameters from a start with c = c0; None if it fails."""
    from scipy.optimize import curve_fit

    def log_loss(logn: np.ndarray, log_a: float, alpha: float, c: float) -> np.ndarray:
        return np.log(np.exp(log_a - alpha * logn) + c)

    c_max = math.exp(y.min()) * (1 - 1e-9)
    slope, intercept = np.polyfit(x, np.log(np.exp(y) - c0), 1)  # the line through L - c0
    start = [intercept, float(np.clip(-slope, 1e-6, MAX_ALPHA - 1e-6)), min(c0, c_max * 0.999)]
    bounds = ([-100.0, 0.0, 0.0], [100.0, MAX_ALPHA, c_max])
    try:
        (log_a, alpha, c), cov = curve_fit(log_loss, x, y, p0=start, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    residual = y - log_loss(x, log_a, alpha, c)
    rmse = float(np.sqrt(np.mean(residual**2)))
    stderr = math.sqrt(cov[1, 1]) if len(x) > 3 and np.isfinite(cov[1, 1]) else None
    return PowerLawFit(math.exp(log_a), float(alpha), float(c), rmse, FULL_FORM, stderr)


def plot_fit(
    n: np.ndarray, loss: np.ndarray, labels: list[str], fit: PowerLawFit, path: Path
) -> None:
    """Log-log PNG: loss against N with the fit; beside it L - c, where the law is a straight line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    panels = 2 if fit.c > 0 else 1
    figure = Figure(figsize=(5.5 * panels, 4.5), dpi=100, layout="constrained")
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    for index, axes in enumerate(np.atleast_1d(figure.subplots(1, panels))):
        floor = fit.c if index == 1 else 0.0  # the right panel shows the reducible loss
        axes.plot(
            grid, fit.predict(grid) - floor, "-", label=f"{fit.form}, alpha = {fit.alpha:.3f}"
        )
        axes.plot(n, loss - floor, "o", color="black", label="measured")
        for x, y, label in zip(n, loss - floor, labels, strict=True):
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if fit.c > 0 and index == 0:
            axes.axhline(fit.c, linestyle=":", color="grey", label=f"c = {fit.c:.3f}")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(ScalarFormatter())
        axes.tick_params(axis="y", which="minor", labelsize=7)
        axes.set_xlabel("N (non-embedding parameters)")
        axes.set_ylabel("L - c (nats/token)" if index else "held-out loss L (nats/token)")
        axes.set_xlim(n.min() / 2, n.max() * 6)  # room for the labels right of the points
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def points(ctx: StageContext, config: Config) -> tuple[list[Row], np.ndarray, np.ndarray]:
    """The upstream stages with both N and L recorded, sorted by N."""
    rows, n, loss = [], [], []
    for row in upstream_rows(ctx, config.kinds):
        size, value = column_value(row, config.params_key), column_value(row, config.loss_key)
        if size is None or value is None:
            raise PipelineError(
                f"stages.{ctx.name}: upstream {row.stage} recorded no "
                f"{config.params_key if size is None else config.loss_key}; set params_key/"
                f"loss_key to keys of its summary ({', '.join(sorted(row.summary)) or 'none'})"
            )
        rows.append(row)
        n.append(float(size))
        loss.append(float(value))
    order = np.argsort(n)
    return [rows[i] for i in order], np.asarray(n)[order], np.asarray(loss)[order]


def run(ctx: StageContext) -> None:
    """Fit the law, then write fit.json, the log-log PNG and the report table."""
    from pipeline.engine.sections import write_sections

    config = ctx.config
    assert isinstance(config, Config)
    rows, n, loss = points(ctx, config)
    try:
        fit = fit_power_law(n, loss)
    except ValueError as exc:
        raise PipelineError(
            f"stages.{ctx.name}: cannot fit a scaling law ({exc}); sweep at least two model sizes"
        ) from None
    columns = ["stage", "N", "tokens", config.loss_key, "fitted", "log residual"]
    table = [
        [row.stage, int(size), column_value(row, "tokens"), value, p, math.log(value / p)]
        for row, size, value, p in zip(rows, n, loss.tolist(), fit.predict(n).tolist(), strict=True)
    ]
    prefix = os.path.commonprefix([row.stage for row in rows]).rpartition(".")[0]
    labels = [row.stage.removeprefix(f"{prefix}.") if prefix else row.stage for row in rows]
    plot_fit(n, loss, labels, fit, ctx.export_dir / FIT_PNG)
    atomic_write_json(
        ctx.export_dir / "fit.json", asdict(fit) | {"columns": columns, "rows": table}
    )
    error = f" +- {fit.alpha_stderr:.3f}" if fit.alpha_stderr is not None else ""
    floor = f", c = {fit.c:.3f}" if fit.form == FULL_FORM else ""
    headline = f"alpha = {fit.alpha:.3f}{error} for L(N) = {fit.form}{floor}"
    note = (
        f"{headline}, a = {fit.a:.4g}: least squares in log L over {len(n)} sizes, RMS log "
        f"residual {fit.rmse_log:.4f}. N = {config.params_key}, L = {config.loss_key}, every "
        f"size trained on the same tokens."
    )
    section = {"title": "Scaling law", "note": note, "columns": columns, "rows": table}
    write_sections(ctx.export_dir, [section | {"images": [FIT_PNG]}])
    summary = {k: v for k, v in asdict(fit).items() if k != "form" and v is not None}
    ctx.write_summary(summary | {"num_points": len(n)}, headline="alpha", note=headline)


SPEC = StageSpec(
    Config,
    run,
    output="table",
    inputs=(AFTER_INPUT,),
    # two sizes at least: fit_power_law refuses fewer, after the whole sweep has trained
    plan_check=lambda view: [p for p in [rows_problem(view, 2, "a scaling law")] if p],
)
