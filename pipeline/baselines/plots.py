"""Figures of baseline comparisons, one PNG per figure (matplotlib's object API, no pyplot).

Every function takes plain arrays and a path, so a new task reuses them without the stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PANEL_INCHES = 3.2
MAX_COLUMNS = 4


def _grid(count: int, title: str, inches: float = PANEL_INCHES) -> tuple[Any, list[Any]]:
    """A figure with `count` panels in rows of at most MAX_COLUMNS, and its axes in order."""
    from matplotlib.figure import Figure

    columns = min(count, MAX_COLUMNS)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(inches * columns, inches * rows), dpi=90, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel().tolist()
    for extra in axes[count:]:
        extra.set_axis_off()
    figure.suptitle(title)
    return figure, axes[:count]


def confusion_grid(
    path: Path, matrices: dict[str, np.ndarray], class_names: Sequence[str], title: str
) -> None:
    """One confusion matrix per model (rows: true class, columns: predicted), counts annotated."""
    figure, axes = _grid(len(matrices), title)
    many = len(class_names) > 12
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=True):
        matrix = np.asarray(matrix)
        ax.imshow(matrix, cmap="Blues")
        ax.set_title(name)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, [] if many else list(class_names), rotation=90, fontsize=7)
        ax.set_yticks(ticks, [] if many else list(class_names), fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(class_names) <= 10:
            threshold = matrix.max() / 2
            for (i, j), count in np.ndenumerate(matrix):
                color = "white" if count > threshold else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    figure.savefig(path, format="png")


def scatter_grid(
    path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray | None]], title: str
) -> None:
    """2-D points per panel, coloured by a label per point (e.g. true class or cluster)."""
    figure, axes = _grid(len(panels), title)
    for ax, (name, (points, colours)) in zip(axes, panels.items(), strict=True):
        ax.scatter(points[:, 0], points[:, 1], c=colours, cmap="tab10", s=6, linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.savefig(path, format="png")


def predicted_vs_actual(
    path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray]], title: str
) -> None:
    """Predicted against true target per model, with the y = x line (points on it are exact)."""
    figure, axes = _grid(len(panels), title)
    for ax, (name, (y_true, y_pred)) in zip(axes, panels.items(), strict=True):
        low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.scatter(y_true, y_pred, s=8, alpha=0.7, linewidths=0)
        ax.set_title(name)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
    figure.savefig(path, format="png")


def band(
    ax: Any, x: Sequence[float], mean: Sequence[float], std: Sequence[float], **kw: Any
) -> None:
    """A mean line with a shaded +-1 std band."""
    mean_a, std_a = np.asarray(mean, float), np.asarray(std, float)
    (line,) = ax.plot(x, mean_a, marker="o", markersize=3, **kw)
    ax.fill_between(x, mean_a - std_a, mean_a + std_a, alpha=0.15, color=line.get_color())


def bias_variance(
    path: Path,
    param: str,
    validation: dict[str, Any],
    learning: dict[str, dict[str, Any]],
    score_name: str,
    title: str,
) -> None:
    """Validation curve (score against `param`) beside learning curves (score against rows)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=90, layout="constrained")
    left, right = figure.subplots(1, 2)
    values = validation["values"]
    numeric = all(isinstance(v, int | float) for v in values)
    x = values if numeric else list(range(len(values)))
    band(left, x, validation["train_mean"], validation["train_std"], label="train")
    band(left, x, validation["val_mean"], validation["val_std"], label="cross-validation")
    if not numeric:
        left.set_xticks(x, [str(v) for v in values])
    elif min(values) > 0 and max(values) / min(values) >= 50:  # e.g. k of k-NN: 1 .. 128
        left.set_xscale("log")
    left.set_xlabel(param)
    left.set_ylabel(score_name)
    left.set_title("validation curve")
    left.legend()
    for setting, curve in learning.items():
        band(right, curve["rows"], curve["val_mean"], curve["val_std"], label=f"{setting} (cv)")
        colour = right.lines[-1].get_color()
        right.plot(
            curve["rows"], curve["train_mean"], "--", color=colour, label=f"{setting} (train)"
        )
    right.set_xlabel("training rows")
    right.set_ylabel(score_name)
    right.set_title("learning curves")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, format="png")


def training_curves(
    path: Path, histories: dict[str, list[dict[str, float]]], keys: Sequence[str], x_key: str
) -> None:
    """One panel per metric key, one line per model, against `x_key` (epoch or step)."""
    figure, axes = _grid(len(keys), "training curves", inches=4.0)
    for ax, key in zip(axes, keys, strict=True):
        for name, history in histories.items():
            points = [(row[x_key], row[key]) for row in history if row.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name)
        ax.set_xlabel(x_key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.savefig(path, format="png")
