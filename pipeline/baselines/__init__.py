"""Baseline tasks for the `baseline` stage: task name -> "module:attribute" of a `Task`.

A new family (e.g. generative models) is one module with a `Task` subclass instance and one line
here; the stage, its result files, report sections and tracking stay unchanged.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.baselines.core import Task

TASKS: dict[str, str] = {
    "regression": "pipeline.baselines.classical:REGRESSION",
    "classification": "pipeline.baselines.classical:CLASSIFICATION",
    "clustering": "pipeline.baselines.unsupervised:CLUSTERING",
    "embedding": "pipeline.baselines.unsupervised:EMBEDDING",
    "curves": "pipeline.baselines.curves:CURVES",
    "vision": "pipeline.baselines.vision:VISION",
    "sequence": "pipeline.baselines.sequence:SEQUENCE",
    "generative": "pipeline.baselines.generative:GENERATIVE",
}


@cache
def get_task(name: str) -> Task:
    """The registered task object (its module is imported on first use)."""
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
