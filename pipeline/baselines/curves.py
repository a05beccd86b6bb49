"""Bias and variance in one picture: validation and learning curves of one model family.

For each model, a validation curve scores the model at every value of one hyperparameter (e.g. a
tree's max_depth) on the training folds and on the held-out fold; learning curves score it at
its first, best and last value against the number of training rows. A gap between
training and cross-validation scores is variance; both low together is bias. The value with the
best cross-validation score is then refitted on all training rows and scored on the test rows.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.baselines import plots
from pipeline.baselines.classical import Split, describe_split, load_split
from pipeline.baselines.core import Job, Task
from pipeline.baselines.estimators import EstimatorSpec, build_estimator, param_name
from pipeline.baselines.metrics import classification_metrics, regression_metrics
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError


class CurveModel(EstimatorSpec):
    """An estimator spec plus the hyperparameter its validation curve sweeps."""

    param: str = Field(description="parameter to sweep, named as in the spec (e.g. max_depth)")
    values: list[Any] = Field(min_length=2, description="values of `param`, in plotting order")


class CurveOptions(Strict):
    """Settings shared by every model of a curves stage."""

    problem: Literal["regression", "classification"] = Field(
        "classification", description="score with R2 (regression) or accuracy (classification)"
    )
    standardize: bool = Field(True, description="StandardScaler in front of every model")
    train_sizes: list[float] = Field(
        [0.1, 0.25, 0.5, 0.75, 1.0], min_length=2, description="fractions of the training folds"
    )


class Curves(Task):
    """Validation and learning curves per model; table: best value and its scores."""

    Model = CurveModel
    Options = CurveOptions
    primary = "test_score"
    columns = ("best_value", "cv_score", "cv_score_std", "train_score", "test_score")

    def load(self, job: Job) -> Split:
        if job.config.cv_folds < 2:
            raise PipelineError(
                f"stages.{job.stage}.cv_folds: curves are cross-validated; set cv_folds: 5"
            )
        if not all(0 < s <= 1 for s in job.options.train_sizes):
            raise PipelineError(
                f"stages.{job.stage}.options.train_sizes: fractions must be in (0, 1]"
            )
        return load_split(job, job.options.problem == "classification")

    def check(self, job: Job, data: Split) -> None:
        for name, spec in job.models.items():
            estimator = self.build(job, name, spec)
            key = param_name(estimator, spec, spec.param)
            if key not in estimator.get_params():
                if spec.steps is not None:  # pipeline parameters: <step>__<param>
                    allowed = [k for k in estimator.get_params() if "__" in k]
                else:  # the model's own parameters (behind the scaler, if any)
                    model = getattr(estimator, "steps", [(None, estimator)])[-1][1]
                    allowed = list(model.get_params(deep=False))
                raise PipelineError(
                    f"{job.where(name)}.param: {spec.param!r} is not a parameter of the model; "
                    f"use one of {', '.join(sorted(allowed))}"
                )
            for value in spec.values:  # every value must give a valid model
                self.build_checked(job, name, spec, value)

    def build_checked(self, job: Job, name: str, spec: CurveModel, value: Any) -> Any:
        """`build` with scikit-learn's parameter checks on the swept value."""
        estimator = self.build(job, name, spec, value)
        for _, step in getattr(estimator, "steps", [(None, estimator)]):
            if hasattr(step, "_parameter_constraints"):
                try:
                    step._validate_params()
                except (TypeError, ValueError) as exc:
                    raise PipelineError(f"{job.where(name)}.values: {value!r}: {exc}") from None
        return estimator

    def describe(self, job: Job, data: Split) -> str:
        score = "R2" if job.options.problem == "regression" else "accuracy"
        suffix = f" Scores are {score}; the table shows each model at its best value."
        return describe_split(job, data) + suffix

    def build(self, job: Job, name: str, spec: CurveModel, value: Any = None) -> Any:
        """The model, with `param` set to `value` when given."""
        estimator = build_estimator(spec, job.where(name), job.seed, job.options.standardize)
        if value is None:
            return estimator
        return estimator.set_params(**{param_name(estimator, spec, spec.param): value})

    def score(self, job: Job, estimator: Any, x: np.ndarray, y: np.ndarray) -> float:
        """The shared eval code's R2 or accuracy of a fitted model."""
        predicted = estimator.predict(x)
        if job.options.problem == "regression":
            return regression_metrics(y, predicted)["r2"]
        return classification_metrics(y, predicted)["accuracy"]

    def cross_scores(
        self, job: Job, name: str, spec: CurveModel, value: Any, split: Split
    ) -> tuple[list[float], list[float]]:
        """Training and validation scores of one setting over the folds of the training rows."""
        x, y = split.data.features[split.train], split.data.target[split.train]
        train_scores, val_scores = [], []
        for fit_rows, val_rows in split.folds:
            estimator = self.build(job, name, spec, value).fit(x[fit_rows], y[fit_rows])
            train_scores.append(self.score(job, estimator, x[fit_rows], y[fit_rows]))
            val_scores.append(self.score(job, estimator, x[val_rows], y[val_rows]))
        return train_scores, val_scores

    def learning_curve(
        self, job: Job, name: str, spec: CurveModel, value: Any, split: Split
    ) -> dict[str, Any]:
        """Scores against the number of training rows: each fold's training rows, truncated."""
        x, y = split.data.features[split.train], split.data.target[split.train]
        keys = ("rows", "train_mean", "train_std", "val_mean", "val_std")
        curve: dict[str, list[float]] = {key: [] for key in keys}
        order = np.random.default_rng(job.seed).permutation(len(y))
        for fraction in job.options.train_sizes:
            train_scores, val_scores = [], []
            for fit_rows, val_rows in split.folds:
                kept = order[np.isin(order, fit_rows)][: max(2, round(fraction * len(fit_rows)))]
                try:
                    estimator = self.build(job, name, spec, value).fit(x[kept], y[kept])
                    train_scores.append(self.score(job, estimator, x[kept], y[kept]))
                    val_scores.append(self.score(job, estimator, x[val_rows], y[val_rows]))
                except ValueError as exc:  # e.g. k-NN with more neighbours than rows
                    where = f"{name} {spec.param}={value} on {len(kept)} rows"
                    job.log.warning("%s: %s (point left out)", where, exc)
                    break
            curve["rows"].append(len(kept))
            complete = len(val_scores) == len(split.folds)
            for key, scores in (("train", train_scores), ("val", val_scores)):
                curve[f"{key}_mean"].append(float(np.mean(scores)) if complete else None)
                curve[f"{key}_std"].append(float(np.std(scores)) if complete else None)
        return curve

    def evaluate(self, job: Job, data: Split, name: str, model: CurveModel) -> dict[str, Any]:
        x, y = data.data.features[data.train], data.data.target[data.train]
        validation: dict[str, list[Any]] = {"values": list(model.values)}
        for key in ("train_mean", "train_std", "val_mean", "val_std"):
            validation[key] = []
        for value in model.values:
            train_scores, val_scores = self.cross_scores(job, name, model, value, data)
            for key, scores in (("train", train_scores), ("val", val_scores)):
                validation[f"{key}_mean"].append(float(np.mean(scores)))
                validation[f"{key}_std"].append(float(np.std(scores)))
        best = int(np.argmax(validation["val_mean"]))
        settings = dict.fromkeys([0, best, len(model.values) - 1])  # first, best, last
        learning = {}
        for i in settings:
            curve = self.learning_curve(job, name, model, model.values[i], data)
            learning[f"{model.param}={model.values[i]}"] = curve
        final = self.build(job, name, model, model.values[best]).fit(x, y)
        test_x, test_y = data.data.features[data.test], data.data.target[data.test]
        return {
            "metrics": {
                "best_value": model.values[best],
                "cv_score": validation["val_mean"][best],
                "cv_score_std": validation["val_std"][best],
                "train_score": validation["train_mean"][best],
                "test_score": self.score(job, final, test_x, test_y),
            },
            "param": model.param,
            "validation_curve": validation,
            "learning_curves": learning,
        }

    def sections(self, job: Job, data: Split, results: dict[str, dict[str, Any]]) -> list[dict]:
        score = "R2" if job.options.problem == "regression" else "accuracy"
        sections = []
        for name, result in results.items():
            path, relative = job.figure(f"curves_{name}.png")
            plots.bias_variance(
                path, result["param"], result["validation_curve"], result["learning_curves"],
                score, f"{name} on {job.config.dataset}",
            )  # fmt: skip
            sections.append(
                {
                    "title": f"bias and variance: {name}",
                    "note": "Bands are +-1 std over folds. Dashed: training score.",
                    "images": [relative],
                }
            )
        return sections


CURVES = Curves()
