"""Tabular datasets for the baseline stage: scikit-learn's bundled sets and user CSV files.

A dataset is a feature matrix, a target column and names. Splits and folds are pure functions of
(labels, fraction or fold count, seed), so every model of a stage, and every rerun, sees the same
rows; classification splits are stratified so small classes appear on both sides.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.errors import PipelineError

# builtin name -> scikit-learn loader (bundled with the package, no download)
BUILTIN_TABULAR = {
    "builtin:diabetes": "load_diabetes",
    "builtin:breast-cancer": "load_breast_cancer",
    "builtin:wine": "load_wine",
    "builtin:digits": "load_digits",
    "builtin:iris": "load_iris",
}
DIGITS_IMAGE_SHAPE = (8, 8)


@dataclass(frozen=True)
class Dataset:
    """Rows of features with one target; `target_names` is set for class labels."""

    name: str
    features: np.ndarray  # [N, F] float64
    target: np.ndarray  # [N] float64 (regression) or int64 class index (classification)
    feature_names: list[str]
    target_names: list[str] | None = None  # class index -> label
    image_shape: tuple[int, int] | None = None  # (H, W) when each row is an image

    @property
    def num_classes(self) -> int:
        return len(self.target_names or [])

    def subset(self, rows: np.ndarray) -> Dataset:
        """The same dataset restricted to `rows` (indices)."""
        return Dataset(
            self.name,
            self.features[rows],
            self.target[rows],
            self.feature_names,
            self.target_names,
            self.image_shape,
        )


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


def load_dataset(spec: str, target: str = "target", classes: bool = False) -> Dataset:
    """A bundled set (`builtin:wine`) or a CSV file with a header and a `target` column.

    `classes` encodes the target as class indices (sorted labels); otherwise it must be numeric.
    """
    if is_builtin(spec):
        if spec not in BUILTIN_TABULAR:
            raise PipelineError(
                f"dataset {spec}: unknown built-in tabular set; "
                f"use one of {', '.join(BUILTIN_TABULAR)} or a CSV path"
            )
        return _load_builtin(spec, classes)
    return load_csv(Path(spec), target, classes)


def _load_builtin(spec: str, classes: bool) -> Dataset:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, BUILTIN_TABULAR[spec])()
    features = np.asarray(bunch.data, dtype=np.float64)
    names = [str(n) for n in getattr(bunch, "feature_names", range(features.shape[1]))]
    image_shape = DIGITS_IMAGE_SHAPE if spec == "builtin:digits" else None
    raw_names = getattr(bunch, "target_names", None)
    if not classes:
        return Dataset(spec, features, bunch.target.astype(np.float64), names, None, image_shape)
    if raw_names is None:
        raise PipelineError(
            f"dataset {spec}: has a continuous target, not class labels; "
            f"use task: regression, or a classification set"
        )
    target_names = [str(n) for n in raw_names]
    return Dataset(spec, features, bunch.target.astype(np.int64), names, target_names, image_shape)


def load_csv(path: Path, target: str, classes: bool) -> Dataset:
    """Numeric feature columns plus the `target` column of a CSV file with a header row."""
    if not path.is_file():
        raise PipelineError(f"dataset {path}: no such file; give a CSV path or a builtin: set")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        raise PipelineError(f"dataset {path}: needs a header row and at least two data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise PipelineError(
            f"dataset {path}: no column {target!r} (columns: {', '.join(header)}); "
            f"set the stage's `target` to the label column"
        )
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise PipelineError(
                f"dataset {path} line {line}: {len(row)} fields, header has {len(header)}"
            )
    column = header.index(target)
    feature_names = [h for i, h in enumerate(header) if i != column]
    features = np.empty((len(body), len(feature_names)), dtype=np.float64)
    for line, row in enumerate(body, start=2):
        cells = [c for i, c in enumerate(row) if i != column]
        try:
            features[line - 2] = [float(c) for c in cells]
        except ValueError:
            bad = next(n for n, c in zip(feature_names, cells, strict=True) if not _is_float(c))
            raise PipelineError(
                f"dataset {path} line {line}: column {bad!r} is not numeric; "
                f"encode it as numbers or drop the column"
            ) from None
    labels = [row[column].strip() for row in body]
    if classes:
        names = sorted(set(labels), key=_label_order)
        index = {name: i for i, name in enumerate(names)}
        encoded = np.array([index[label] for label in labels], dtype=np.int64)
        return Dataset(str(path), features, encoded, feature_names, names)
    if not all(_is_float(label) for label in labels):
        raise PipelineError(
            f"dataset {path}: column {target!r} is not numeric; use task: classification for "
            f"labels, or encode the target as numbers"
        )
    return Dataset(str(path), features, np.array(labels, dtype=np.float64), feature_names)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_order(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order, then text labels alphabetically."""
    return (0, float(label), "") if _is_float(label) else (1, 0.0, label)


def dataset_signature(spec: str) -> dict[str, Any]:
    """What identifies a dataset's content beyond its name (for stage fingerprints)."""
    from importlib.metadata import version

    if is_builtin(spec):
        return {"scikit-learn": version("scikit-learn")}
    path = Path(spec)
    if not path.is_file():
        return {"missing": str(path)}
    stat = path.stat()
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def subsample_rows(dataset: Dataset, max_rows: int | None, seed: int) -> Dataset:
    """At most `max_rows` rows, drawn without replacement in an order fixed by `seed`."""
    if max_rows is None or max_rows >= len(dataset.target):
        return dataset
    rows = np.random.default_rng(seed).permutation(len(dataset.target))[:max_rows]
    return dataset.subset(np.sort(rows))


def split_rows(
    target: np.ndarray, test_fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices; stratified by class when `stratify`."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(target))
    try:
        train, test = train_test_split(
            rows, test_size=test_fraction, random_state=seed, stratify=target if stratify else None
        )
    except ValueError as exc:
        raise PipelineError(
            f"test_fraction {test_fraction} on {len(rows)} rows: {exc}; "
            f"use more rows or a different test_fraction"
        ) from None
    return np.sort(train), np.sort(test)


def fold_rows(
    target: np.ndarray, folds: int, seed: int, stratify: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` (train, validation) index pairs covering every row once as validation."""
    from sklearn.model_selection import KFold, StratifiedKFold

    splitter = (StratifiedKFold if stratify else KFold)(folds, shuffle=True, random_state=seed)
    if stratify and np.bincount(target).min() < folds:
        raise PipelineError(
            f"cv_folds {folds}: the smallest class has {np.bincount(target).min()} training rows; "
            f"use fewer folds"
        )
    return list(splitter.split(np.zeros(len(target)), target))
