"""Registry of stage kinds: kind -> module with a `Config` class and a `run(ctx)` function."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from pipeline.config import StageConfig

KINDS: dict[str, str] = {
    "tokenizer": "data_prep.tokenizer",
    "tokenize": "data_prep.tokenize",
    "pretrain": "pipeline.stages.pretrain",
    "sft": "pipeline.stages.sft",
    "reward": "pipeline.stages.reward",
    "rlhf": "pipeline.stages.rlhf",
    "eval": "eval.lm",
    "report": "eval.report",
    "images": "data_prep.images",
    "diffusion": "pipeline.stages.diffusion",
    "vae": "pipeline.stages.vae",
    "image_eval": "eval.images",
    "baseline": "pipeline.stages.baseline",
    "compare": "eval.compare",
    "scaling": "eval.scaling",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(KINDS[kind])


@cache
def config_classes() -> dict[str, type[StageConfig]]:
    return {kind: stage_module(kind).Config for kind in KINDS}
