"""Estimators named by import path: the spec in a recipe, and the scikit-learn object it builds.

Any class with scikit-learn's estimator contract works (scikit-learn, XGBoost's and LightGBM's
sklearn wrappers, umap.UMAP): hyperparameters go to the constructor, learning happens in `fit`.
A pipeline (`steps:`) is `sklearn.pipeline.make_pipeline` of its steps, so a step's parameters are
addressed as `<lowercased class name>__<param>`, e.g. `polynomialfeatures__degree`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from pydantic import Field, model_validator

from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError


class StepSpec(Strict):
    """One step of a pipeline: an estimator class by import path and its parameters."""

    estimator: str = Field(description="import path, e.g. sklearn.preprocessing.StandardScaler")
    params: dict[str, Any] = {}


class EstimatorSpec(Strict):
    """An estimator by import path with parameters, or a pipeline of steps (exactly one)."""

    estimator: str | None = Field(None, description="import path, e.g. sklearn.linear_model.Ridge")
    params: dict[str, Any] = Field({}, description="constructor arguments")
    steps: list[StepSpec] | None = Field(None, min_length=1, description="make_pipeline steps")

    @model_validator(mode="after")
    def _one_form(self) -> EstimatorSpec:
        if (self.estimator is None) == (self.steps is None):
            raise ValueError("give either estimator (with params) or steps, not both or neither")
        if self.steps is not None and self.params:
            raise ValueError("params belong to each step when steps are given")
        return self


def import_class(path: str, where: str) -> type:
    """The class at a dotted import path; a one-line error names the recipe key and the fix."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise PipelineError(
            f"{where}: {path!r} is not an import path; write module.Class, "
            f"e.g. sklearn.linear_model.Ridge"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(
            f"{where}: cannot import module {module_name!r} ({exc}); "
            f"check the spelling or install the package"
        ) from None
    found = getattr(module, attribute, None)
    if not isinstance(found, type):
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attribute, public, n=1, cutoff=0.6)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        raise PipelineError(f"{where}: {module_name} has no class {attribute!r}{hint}")
    return found


def _accepted_params(cls: type) -> tuple[list[str], bool]:
    """Constructor parameter names, and whether it also takes **kwargs (XGBoost, LightGBM)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def build_step(path: str, params: dict[str, Any], where: str, seed: int) -> Any:
    """Construct one estimator, seeding `random_state` when it has one and the recipe did not."""
    cls = import_class(path, f"{where}.estimator")
    if not hasattr(cls, "fit"):
        raise PipelineError(f"{where}.estimator: {path} has no fit method; name an estimator class")
    names, open_kwargs = _accepted_params(cls)
    for key in params:
        if key not in names and not open_kwargs:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PipelineError(
                f"{where}.params.{key}: {cls.__name__} has no parameter {key!r}{hint} "
                f"(allowed: {', '.join(names)})"
            )
    if "random_state" in names and "random_state" not in params:
        params = {**params, "random_state": seed}
    try:
        estimator = cls(**params)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}.params: {cls.__name__}({params}) failed: {exc}") from None
    if hasattr(estimator, "_parameter_constraints"):  # scikit-learn's own value checks
        try:
            estimator._validate_params()
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{where}.params: {exc}") from None
    return estimator


def build_estimator(spec: EstimatorSpec, where: str, seed: int, standardize: bool = False) -> Any:
    """The estimator (or pipeline) of a spec; `standardize` puts a StandardScaler in front."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if spec.steps is not None:
        steps = [
            build_step(s.estimator, s.params, f"{where}.steps.{i}", seed)
            for i, s in enumerate(spec.steps)
        ]
    else:
        assert spec.estimator is not None
        steps = [build_step(spec.estimator, spec.params, where, seed)]
    if standardize:
        steps.insert(0, StandardScaler())
    return steps[0] if len(steps) == 1 else make_pipeline(*steps)


def param_name(estimator: Any, spec: EstimatorSpec, param: str) -> str:
    """`param` as named in the spec, addressed inside the built estimator (scaler in front)."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline) and spec.estimator is not None:
        return f"{estimator.steps[-1][0]}__{param}"
    return param
