"""Registry of stage kinds: kind -> name of the module that declares its `SPEC`
(pipeline.engine.inputs.StageSpec: config class, run, typed inputs and output).

Module names are strings resolved with importlib, so the engine imports no stage module and
every stage module may import the engine (config, context) without an import cycle.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "curate": "data_prep.curate",
    "tokenizer": "data_prep.tokenizer",
    "tokenize": "data_prep.tokenize",
    "pretrain": "pipeline.stages.pretrain",
    "sft": "pipeline.stages.sft",
    "reward": "pipeline.stages.reward",
    "preferences": "pipeline.stages.preferences",
    "rlhf": "pipeline.stages.rlhf",
    "eval": "eval.lm",
    "report": "eval.report",
    "images": "data_prep.images",
    "diffusion": "pipeline.stages.diffusion",
    "vae": "pipeline.stages.vae",
    "text_encode": "pipeline.stages.text_encode",
    "image_eval": "eval.image_eval",
    "baseline": "pipeline.baselines.stage",
    "compare": "eval.compare",
    "scaling": "eval.scaling",
}


def stage_module(kind: str) -> ModuleType:
    """The module of a stage kind (imported on first use)."""
    return importlib.import_module(KINDS[kind])
