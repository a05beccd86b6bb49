"""Metrics for baseline models: pure functions of labels, predictions, scores and features.

Written with numpy so every baseline family (classical estimators, torch nets, generative models)
is scored by the same code; tests check each against scikit-learn's own metric functions.
Conventions follow scikit-learn's defaults: binary precision/recall/F1 are for class 1, multiclass
ones are macro averages over the classes present in y_true or y_pred, an undefined ratio counts as
0, and ROC-AUC is one-vs-rest macro for more than two classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CHUNK_ROWS = 1024  # rows of a pairwise-distance block (memory: CHUNK_ROWS x N floats)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R2 (1 - residual / total sum of squares)."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    residual = y_true - y_pred
    mse = float(np.mean(residual**2))
    total = float(np.sum((y_true - y_true.mean()) ** 2))
    sse = float(np.sum(residual**2))
    # A constant target has no variance to explain: exact predictions score 1, others 0.
    r2 = 1.0 - sse / total if total > 0 else float(sse == 0)
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(residual))), "r2": r2}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_score: np.ndarray | None = None,
    num_classes: int | None = None,
) -> dict[str, float | None]:
    """Accuracy, precision, recall, F1 and ROC-AUC (None without scores or with one class).

    Labels are class indices 0..num_classes-1. `y_score` is [N] (binary: score of class 1) or
    [N, num_classes] (probabilities or any per-class scores; only their order matters).
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    num_classes = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    counts = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(counts).astype(np.float64)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, actual)
    f1 = _ratio(2 * tp, predicted + actual)
    # Binary: class 1 only (scikit-learn's average="binary"); else classes seen on either side.
    chosen = np.array([1]) if num_classes == 2 else np.flatnonzero((predicted + actual) > 0)
    return {
        "accuracy": float(tp.sum() / len(y_true)),
        "precision": float(precision[chosen].mean()),
        "recall": float(recall[chosen].mean()),
        "f1": float(f1[chosen].mean()),
        "roc_auc": None if y_score is None else roc_auc(y_true, y_score),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0 where the denominator is 0."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return None
    ranks = rankdata(score)  # average ranks for ties (Mann-Whitney U)
    return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Binary AUC, or the one-vs-rest macro average over the classes present in y_true."""
    y_true, y_score = np.asarray(y_true, np.int64), np.asarray(y_score, np.float64)
    if y_score.ndim == 1 or y_score.shape[1] == 2:
        column = y_score if y_score.ndim == 1 else y_score[:, 1]
        return binary_auc(y_true == 1, column)
    aucs = [binary_auc(y_true == c, y_score[:, c]) for c in range(y_score.shape[1])]
    present = [a for a in aucs if a is not None]
    return float(np.mean(present)) if len(present) >= 2 else None


def _pairwise_blocks(features: np.ndarray):
    """Yield (row slice, [rows, N] Euclidean distances) blocks covering all pairs."""
    features = np.asarray(features, np.float64)
    squared = np.einsum("ij,ij->i", features, features)
    for start in range(0, len(features), CHUNK_ROWS):
        block = features[start : start + CHUNK_ROWS]
        d2 = squared[start : start + CHUNK_ROWS, None] + squared[None, :] - 2 * block @ features.T
        yield slice(start, start + len(block)), np.sqrt(np.maximum(d2, 0.0))


def silhouette(features: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean silhouette (Euclidean); None unless 2 <= clusters <= N - 1. Memory O(N x CHUNK_ROWS).

    Every label is a cluster (DBSCAN's noise label -1 included); points alone in their cluster
    score 0, as in scikit-learn.
    """
    _, labels = np.unique(np.asarray(labels), return_inverse=True)
    num_clusters, n = int(labels.max()) + 1, len(labels)
    if not 2 <= num_clusters <= n - 1:
        return None
    onehot = np.eye(num_clusters)[labels]  # [N, K]
    sizes = onehot.sum(axis=0)
    scores = np.empty(n)
    for rows, dist in _pairwise_blocks(features):
        sums = dist @ onehot  # [rows, K] distance to every cluster, summed
        own = labels[rows]
        own_size = sizes[own]
        a = sums[np.arange(len(own)), own] / np.maximum(own_size - 1, 1)
        means = sums / sizes
        means[np.arange(len(own)), own] = np.inf
        b = means.min(axis=1)
        s = (b - a) / np.maximum(a, b)
        scores[rows] = np.where(own_size > 1, np.nan_to_num(s), 0.0)
    return float(scores.mean())


def adjusted_rand(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index: pair agreement between two labelings, 0 for chance, 1 when equal."""
    _, true_ids = np.unique(np.asarray(labels_true), return_inverse=True)
    _, pred_ids = np.unique(np.asarray(labels_pred), return_inverse=True)
    table = np.zeros((true_ids.max() + 1, pred_ids.max() + 1), np.float64)
    np.add.at(table, (true_ids, pred_ids), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols, total = pairs(table.sum(axis=1)), pairs(table.sum(axis=0)), pairs(table.sum())
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # both labelings trivial (one cluster, or all singletons)
        return 1.0
    return (index - expected) / (maximum - expected)


def trustworthiness(features: np.ndarray, embedded: np.ndarray, n_neighbors: int = 5) -> float:
    """How far the embedding's k nearest neighbours are from being neighbours in the input (1 = all
    are); penalises each intruder by its rank in the input space. Needs n_neighbors < N / 2."""
    n = len(features)
    if not 1 <= n_neighbors < n / 2:
        raise ValueError(f"n_neighbors must be in [1, {n / 2}) for {n} points, got {n_neighbors}")
    ranks = np.empty((n, n), dtype=np.int64)  # ranks[i, j]: rank of j among i's neighbours
    for rows, dist in _pairwise_blocks(features):
        dist[np.arange(len(dist)), np.arange(rows.start, rows.stop)] = np.inf
        order = np.argsort(dist, axis=1)
        ranks[rows][np.arange(len(dist))[:, None], order] = np.arange(1, n + 1)
    penalty = 0
    for rows, dist in _pairwise_blocks(embedded):
        dist[np.arange(len(dist)), np.arange(rows.start, rows.stop)] = np.inf
        neighbours = np.argpartition(dist, n_neighbors, axis=1)[:, :n_neighbors]
        excess = ranks[rows][np.arange(len(dist))[:, None], neighbours] - n_neighbors
        penalty += int(excess[excess > 0].sum())
    k = n_neighbors
    return 1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))


def neighbour_accuracy(embedded: np.ndarray, labels: np.ndarray, n_neighbors: int = 5) -> float:
    """Leave-one-out k-NN accuracy in the embedding: how well classes stay separated."""
    labels = np.asarray(labels, np.int64)
    correct = 0
    for rows, dist in _pairwise_blocks(embedded):
        dist[np.arange(len(dist)), np.arange(rows.start, rows.stop)] = np.inf
        neighbours = np.argpartition(dist, n_neighbors, axis=1)[:, :n_neighbors]
        votes = labels[neighbours]  # [rows, k]
        counts = np.zeros((len(votes), labels.max() + 1), np.int64)
        np.add.at(counts, (np.arange(len(votes))[:, None], votes), 1)
        correct += int((counts.argmax(axis=1) == labels[rows]).sum())
    return correct / len(labels)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population standard deviation (ddof 0) of cross-validation fold scores."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}
