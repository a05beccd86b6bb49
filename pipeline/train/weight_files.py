"""Where a model directory's tensors are, and reading one of them (or some of its rows) without
making the whole file resident: the file access of pipeline.train.sharded_load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import torch

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
Source = tuple[Path, str]  # where a model tensor's weights are: (file, name in it)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor: the index's weight map, or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise PipelineError(
            f"model.path {model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}; loading at scale "
            f"reads safetensors weights (save the model with save_pretrained)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def read_tensor(source: Source, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """Rows [start, end) of a source's tensor (all of it without start), through a mapping of
    its own (see the module docstring): only the rows read become resident, while they live."""
    from safetensors import safe_open

    path, name = source
    with safe_open(path, framework="pt") as handle:
        if start is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[start:end]
