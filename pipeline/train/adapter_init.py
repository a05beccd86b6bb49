"""The LoRA adapter's initial weights, the same under every launch engine.

peft initialises lora_A from the global random stream when it wraps the model, so the values
depend on what drew from that stream before, and a model whose base FSDP2 shards before it
exists (pipeline.train.trl_load) has no whole lora_A to draw into. Each adapter weight is
therefore drawn again here from a generator of its own, seeded by the stage's seed and the
weight's name, with peft's distributions: lora_A uniform in +-1/sqrt(fan_in) (kaiming_uniform
with a = sqrt(5)), lora_B zeros (so the adapted model starts as its base), and for embedding
adapters lora_embedding_A zeros and lora_embedding_B standard normal. A rank holding a shard
(an FSDP2 DTensor) draws the whole weight and keeps its part; one process, DDP, FSDP2 and ZeRO-3
(before deepspeed.initialize partitions the adapter) start from the same adapter.

A reward model's score head, which no causal LM's files hold, is drawn the same way by
`seed_head` (transformers' init: normal with the config's initializer_range, bias zero), keyed by
its name in the bare model: peft's trained copy and the original it keeps start equal.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

ADAPTER_WEIGHTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def seed_adapter(model: Any, seed: int) -> int:
    """Draw every LoRA weight of `model` (a peft model) as the module docstring says; the
    number of weights drawn."""
    import torch

    drawn = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            kind = next((k for k in ADAPTER_WEIGHTS if f".{k}." in name), None)
            if kind is None:
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            shape = tuple(param.shape)  # a DTensor's shape is the whole weight's
            whole = _draw(kind, shape, generator)
            _keep_part(param, whole)
            drawn += 1
    return drawn


def seed_head(model: Any, seed: int, head: str = "score") -> int:
    """Draw the weights of `model`'s `head` module (a peft model or not; under ZeRO-3 partitioned
    or not) as the module docstring says; the number of tensors drawn."""
    import torch

    config = getattr(model, "config", None)
    std = getattr(config, "initializer_range", 0.02)
    drawn = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            bare = bare_name(name)
            if bare.split(".")[0] != head:
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{bare}".encode()))
            shape = tuple(getattr(param, "ds_shape", param.shape))
            whole = torch.zeros(shape)
            if bare.endswith(".weight"):
                whole = torch.randn(shape, generator=generator) * std
            _keep_part(param, whole)
            drawn += 1
    return drawn


def bare_name(name: str) -> str:
    """A parameter's name in the model peft wraps: `score.weight` for
    `base_model.model.score.modules_to_save.default.weight`, `q_proj.weight` for
    `q_proj.base_layer.weight` (the copies peft keeps are named as the module they copy)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(wrapper, ".")
    return name


def _draw(kind: str, shape: tuple[int, ...], generator: Any) -> Any:
    import torch

    if kind == "lora_A":
        bound = 1 / math.sqrt(shape[1])
        return torch.rand(shape, generator=generator) * (2 * bound) - bound
    if kind == "lora_embedding_B":
        return torch.randn(shape, generator=generator)
    return torch.zeros(shape)


def _keep_part(param: Any, whole: Any) -> None:
    """Copy `whole` into `param`, or this rank's part of it into an FSDP2 shard or a ZeRO-3
    partition (gathered: every rank drew the same whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(whole.to(param.device, param.dtype))
    elif isinstance(param, DTensor):
        local = param.to_local()
        # every rank drew the same whole: its own part, without communication
        whole = whole.to(local.device, local.dtype)
        part = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        local.copy_(part.to_local())
    else:
        param.data.copy_(whole.to(param.device, param.dtype))
