"""Supervised classical baselines: regression and classification with scikit-learn estimators.

Every model is fitted on the same training rows and scored on the same held-out rows (stratified
for classes); with `cv_folds`, each is also cross-validated on the training rows with the same
folds, reported as mean and standard deviation. Features are standardized inside each model's
pipeline (fitted on training rows only) unless `options.standardize` is false.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.baselines import plots
from pipeline.baselines.core import Job, Task
from pipeline.baselines.data import Dataset, fold_rows, load_dataset, split_rows, subsample_rows
from pipeline.baselines.estimators import EstimatorSpec, build_estimator
from pipeline.baselines.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_std,
    regression_metrics,
)
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError


class SupervisedOptions(Strict):
    """Settings shared by every model of a regression or classification stage."""

    standardize: bool = Field(True, description="StandardScaler in front of every model")


@dataclass(frozen=True)
class Split:
    """A dataset with its train/test rows and the cross-validation folds of the training rows."""

    data: Dataset
    train: np.ndarray
    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # indices into `train`


def load_split(job: Job, classes: bool) -> Split:
    """Load the stage's dataset and split it the same way for every model."""
    cfg = job.config
    data = subsample_rows(load_dataset(cfg.dataset, cfg.target, classes), cfg.max_rows, job.seed)
    train, test = split_rows(data.target, cfg.test_fraction, job.seed, stratify=classes)
    folds = fold_rows(data.target[train], cfg.cv_folds, job.seed, classes) if cfg.cv_folds else []
    return Split(data, train, test, folds)


def describe_split(job: Job, split: Split) -> str:
    """Rows used, how they were split, and the cross-validation setup."""
    text = (
        f"{len(split.train)} training and {len(split.test)} held-out rows of "
        f"{split.data.features.shape[1]} features (seed {job.seed})"
    )
    if split.folds:
        text += f"; cv_* columns: {len(split.folds)}-fold cross-validation on the training rows"
    return text + "."


def class_scores(estimator: Any, features: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-class scores for ROC-AUC: probabilities, else decision values; [N] for two classes."""
    for method in ("predict_proba", "decision_function"):
        if not hasattr(estimator, method):
            continue
        scores = np.asarray(getattr(estimator, method)(features), np.float64)
        classes = np.asarray(estimator.classes_)
        if scores.ndim == 1:  # binary decision values: score of classes[1]
            return scores if num_classes == 2 else None
        full = np.full((len(features), num_classes), -np.inf if method != "predict_proba" else 0.0)
        full[:, classes] = scores
        return full[:, 1] if num_classes == 2 else full
    return None


def _last_step(estimator: Any) -> Any:
    """The model of a pipeline (or the estimator itself)."""
    return getattr(estimator, "steps", [(None, estimator)])[-1][1]


class _Supervised(Task):
    Model = EstimatorSpec
    Options = SupervisedOptions
    classes = False

    def load(self, job: Job) -> Split:
        return load_split(job, self.classes)

    def check(self, job: Job, data: Split) -> None:
        from sklearn.base import is_classifier, is_regressor

        wanted = is_classifier if self.classes else is_regressor
        kind = "classifier" if self.classes else "regressor"
        for name, spec in job.models.items():
            estimator = build_estimator(spec, job.where(name), job.seed, job.options.standardize)
            if not wanted(estimator):
                raise PipelineError(
                    f"{job.where(name)}: {type(_last_step(estimator)).__name__} is not a {kind}; "
                    f"name a {kind} (its scikit-learn estimator type) for task: {job.config.task}"
                )

    def describe(self, job: Job, data: Split) -> str:
        return describe_split(job, data)

    def build(self, job: Job, name: str, spec: EstimatorSpec) -> Any:
        return build_estimator(spec, job.where(name), job.seed, job.options.standardize)

    def fit(self, job: Job, name: str, estimator: Any, x: np.ndarray, y: np.ndarray) -> Any:
        """Fit, turning a bad parameter value found only at fit time into a one-line error."""
        try:
            return estimator.fit(x, y)
        except ValueError as exc:
            if type(exc).__name__ == "InvalidParameterError":
                raise PipelineError(f"{job.where(name)}.params: {exc}") from None
            raise

    def cross_validate(self, job: Job, name: str, spec: EstimatorSpec, split: Split) -> dict:
        """`cv_<metric>` mean and `cv_<metric>_std` over the folds, for the primary metric."""
        if not split.folds:
            return {}
        x, y = split.data.features[split.train], split.data.target[split.train]
        scores = []
        for fit_rows, val_rows in split.folds:
            estimator = self.fit(job, name, self.build(job, name, spec), x[fit_rows], y[fit_rows])
            scores.append(self.score(estimator, x[val_rows], y[val_rows], split.data)[self.primary])
        summary = mean_std(scores)
        return {
            f"cv_{self.primary}": summary["mean"],
            f"cv_{self.primary}_std": summary["std"],
            "cv_folds": scores,
        }

    def score(self, estimator: Any, x: np.ndarray, y: np.ndarray, data: Dataset) -> dict:
        raise NotImplementedError


class Regression(_Supervised):
    """Regression baselines: MSE, RMSE, MAE and R2 on held-out rows."""

    primary = "r2"
    columns = ("mse", "rmse", "mae", "r2", "cv_r2", "cv_r2_std")

    def score(self, estimator: Any, x: np.ndarray, y: np.ndarray, data: Dataset) -> dict:
        return regression_metrics(y, estimator.predict(x))

    def evaluate(self, job: Job, data: Split, name: str, model: EstimatorSpec) -> dict[str, Any]:
        cv = self.cross_validate(job, name, model, data)
        x, y = data.data.features, data.data.target
        estimator = self.fit(job, name, self.build(job, name, model), x[data.train], y[data.train])
        predicted = estimator.predict(x[data.test])
        job.save_arrays(name, y_true=y[data.test], y_pred=predicted)
        metrics = regression_metrics(y[data.test], predicted)
        folds = cv.pop("cv_folds", None)
        return {"metrics": {**metrics, **cv}, "cv_scores": folds}

    def sections(self, job: Job, data: Split, results: dict[str, dict[str, Any]]) -> list[dict]:
        panels = {}
        for name in results:
            arrays = job.arrays(name)
            if arrays:
                panels[name] = (arrays["y_true"], arrays["y_pred"])
        path, relative = job.figure("predicted_vs_actual.png")
        plots.predicted_vs_actual(path, panels, f"held-out rows of {job.config.dataset}")
        return [{"title": "predicted against true target", "images": [relative]}]


class Classification(_Supervised):
    """Classification baselines: accuracy, precision, recall, F1, ROC-AUC and confusion matrices."""

    classes = True
    primary = "accuracy"
    columns = ("accuracy", "precision", "recall", "f1", "roc_auc", "cv_accuracy", "cv_accuracy_std")

    def score(self, estimator: Any, x: np.ndarray, y: np.ndarray, data: Dataset) -> dict:
        return classification_metrics(y, estimator.predict(x), num_classes=data.num_classes)

    def evaluate(self, job: Job, data: Split, name: str, model: EstimatorSpec) -> dict[str, Any]:
        cv = self.cross_validate(job, name, model, data)
        x, y, k = data.data.features, data.data.target, data.data.num_classes
        estimator = self.fit(job, name, self.build(job, name, model), x[data.train], y[data.train])
        predicted = np.asarray(estimator.predict(x[data.test]), np.int64)
        scores = class_scores(estimator, x[data.test], k)
        arrays = {"y_true": y[data.test], "y_pred": predicted}
        if scores is not None:
            arrays["y_score"] = scores
        job.save_arrays(name, **arrays)
        metrics = classification_metrics(y[data.test], predicted, scores, k)
        folds = cv.pop("cv_folds", None)
        return {
            "metrics": {**metrics, **cv},
            "cv_scores": folds,
            "confusion_matrix": confusion_matrix(y[data.test], predicted, k),
            "class_names": data.data.target_names,
        }

    def sections(self, job: Job, data: Split, results: dict[str, dict[str, Any]]) -> list[dict]:
        matrices = {name: np.asarray(r["confusion_matrix"]) for name, r in results.items()}
        path, relative = job.figure("confusion_matrices.png")
        names = data.data.target_names or []
        plots.confusion_grid(path, matrices, names, f"held-out rows of {job.config.dataset}")
        return [
            {
                "title": "confusion matrices",
                "note": "Rows are true classes, columns predicted classes (held-out rows).",
                "images": [relative],
            }
        ]


REGRESSION = Regression()
CLASSIFICATION = Classification()
