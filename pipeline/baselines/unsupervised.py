"""Unsupervised classical baselines: clustering and 2-D embeddings (dimensionality reduction).

Both use every row (or a seeded `max_rows` subsample: t-SNE and the pairwise metrics are
quadratic in rows); labels are never shown to a model, only to the scores. Clustering reports
silhouette (shape, no labels) and adjusted Rand against the true classes; an embedding reports
trustworthiness (are 2-D neighbours true neighbours?) and leave-one-out k-NN accuracy in 2-D.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from pipeline.baselines import plots
from pipeline.baselines.core import Job, Task
from pipeline.baselines.data import Dataset, load_dataset, subsample_rows
from pipeline.baselines.estimators import EstimatorSpec, build_estimator
from pipeline.baselines.metrics import (
    adjusted_rand,
    neighbour_accuracy,
    silhouette,
    trustworthiness,
)
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError


class ClusteringOptions(Strict):
    """Settings shared by every clustering model of a stage."""

    standardize: bool = Field(True, description="cluster standardized features")


class EmbeddingOptions(Strict):
    """Settings shared by every embedding of a stage."""

    standardize: bool = Field(False, description="embed standardized features")
    n_neighbors: int = Field(5, ge=1, description="k of trustworthiness and k-NN accuracy")


def load_features(job: Job) -> Dataset:
    """The dataset with class labels (for scores and colours), standardized when asked."""
    cfg = job.config
    data = subsample_rows(load_dataset(cfg.dataset, cfg.target, True), cfg.max_rows, job.seed)
    if not job.options.standardize:
        return data
    mean, std = data.features.mean(axis=0), data.features.std(axis=0)
    scaled = (data.features - mean) / np.where(std > 0, std, 1.0)
    return Dataset(data.name, scaled, data.target, data.feature_names, data.target_names)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """First two principal components, to draw any clustering in the same plane."""
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


class Clustering(Task):
    """k-means, agglomerative, DBSCAN, mixtures: any estimator with fit_predict."""

    Model = EstimatorSpec
    Options = ClusteringOptions
    primary = "adjusted_rand"
    columns = ("adjusted_rand", "silhouette", "clusters", "noise_fraction")

    def load(self, job: Job) -> Dataset:
        return load_features(job)

    def check(self, job: Job, data: Dataset) -> None:
        for name, spec in job.models.items():
            estimator = build_estimator(spec, job.where(name), job.seed)
            if not hasattr(estimator, "fit_predict"):
                raise PipelineError(
                    f"{job.where(name)}.estimator: {type(estimator).__name__} has no "
                    f"fit_predict; name a clustering estimator such as sklearn.cluster.KMeans"
                )

    def describe(self, job: Job, data: Dataset) -> str:
        scaled = "standardized " if job.options.standardize else ""
        return (
            f"{len(data.target)} rows of {data.features.shape[1]} {scaled}features, "
            f"{data.num_classes} true classes (used only by adjusted_rand and the figure)."
        )

    def evaluate(self, job: Job, data: Dataset, name: str, model: EstimatorSpec) -> dict[str, Any]:
        estimator = build_estimator(model, job.where(name), job.seed)
        labels = np.asarray(estimator.fit_predict(data.features), np.int64)
        job.save_arrays(name, labels=labels)
        noise = labels < 0  # DBSCAN marks noise as -1
        return {
            "metrics": {
                "adjusted_rand": adjusted_rand(data.target, labels),
                "silhouette": silhouette(data.features, labels),
                "clusters": int(len(np.unique(labels[~noise]))),
                "noise_fraction": float(noise.mean()),
            }
        }

    def sections(self, job: Job, data: Dataset, results: dict[str, dict[str, Any]]) -> list[dict]:
        plane = pca_2d(data.features)
        panels: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
            "true classes": (plane, data.target)
        }
        for name in results:
            panels[name] = (plane, job.arrays(name)["labels"])
        path, relative = job.figure("clusters.png")
        title = f"clusters of {job.config.dataset} (first 2 principal components)"
        plots.scatter_grid(path, panels, title)
        return [
            {"title": "clusters", "note": "Colour = cluster (noise: -1).", "images": [relative]}
        ]


class Embedding(Task):
    """PCA, t-SNE, UMAP or any estimator with fit_transform, to 2 dimensions."""

    Model = EstimatorSpec
    Options = EmbeddingOptions
    primary = "trustworthiness"
    columns = ("trustworthiness", "knn_accuracy")

    def load(self, job: Job) -> Dataset:
        data = load_features(job)
        if not 1 <= job.options.n_neighbors < len(data.target) / 2:
            raise PipelineError(
                f"stages.{job.stage}.options.n_neighbors: {job.options.n_neighbors} needs fewer "
                f"than half the {len(data.target)} rows; lower it or use more rows"
            )
        return data

    def check(self, job: Job, data: Dataset) -> None:
        for name, spec in job.models.items():
            estimator = build_estimator(spec, job.where(name), job.seed)
            if not hasattr(estimator, "fit_transform"):
                raise PipelineError(
                    f"{job.where(name)}.estimator: {type(estimator).__name__} has no "
                    f"fit_transform; name an embedding such as sklearn.decomposition.PCA"
                )

    def describe(self, job: Job, data: Dataset) -> str:
        k = job.options.n_neighbors
        return (
            f"{len(data.target)} rows of {data.features.shape[1]} features embedded in 2-D; "
            f"trustworthiness and leave-one-out k-NN accuracy with k = {k}."
        )

    def evaluate(self, job: Job, data: Dataset, name: str, model: EstimatorSpec) -> dict[str, Any]:
        estimator = build_estimator(model, job.where(name), job.seed)
        embedded = np.asarray(estimator.fit_transform(data.features), np.float64)
        if embedded.ndim != 2 or embedded.shape[1] < 2:
            raise PipelineError(
                f"{job.where(name)}.params: the embedding has shape {embedded.shape}; "
                f"set n_components: 2"
            )
        job.save_arrays(name, embedding=embedded[:, :2])
        k = job.options.n_neighbors
        return {
            "metrics": {
                "trustworthiness": trustworthiness(data.features, embedded, k),
                "knn_accuracy": neighbour_accuracy(embedded, data.target, k),
            }
        }

    def sections(self, job: Job, data: Dataset, results: dict[str, dict[str, Any]]) -> list[dict]:
        panels: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
            name: (job.arrays(name)["embedding"], data.target) for name in results
        }
        path, relative = job.figure("embeddings.png")
        plots.scatter_grid(path, panels, f"2-D embeddings of {job.config.dataset}")
        return [{"title": "2-D embeddings", "note": "Colour = true class.", "images": [relative]}]


CLUSTERING = Clustering()
EMBEDDING = Embedding()
