"""Parallelism is chosen here and only here: the recipe's launch section becomes Accelerate
plugins (our own loops) or TrainingArguments fields (TRL trainers), from one DeepSpeed config
builder, so batch size, accumulation and world size can never disagree between the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.config import LaunchConfig, deep_merge
from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    from accelerate import Accelerator

# Keys whose values must agree with the recipe; "auto" lets DeepSpeed/Accelerate fill them.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


@dataclass(frozen=True)
class TrainShape:
    """What every engine must agree on: per-rank micro batch, accumulation, world, precision."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    precision: str = "fp32"  # fp32 | bf16
    grad_clip: float = 1.0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def resolve_precision(precision: str) -> str:
    """auto: bf16 on a GPU that has it, else fp32."""
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(launch: LaunchConfig, shape: TrainShape) -> dict[str, Any]:
    """The DeepSpeed JSON for this launch; an expert file's values win, batch keys are checked."""
    offload = {"device": "cpu", "pin_memory": False}
    # Communication buckets sized from the model's width at prepare time (Accelerate fills "auto"
    # as the HF integration does); DeepSpeed's defaults (5e8 elements) dwarf small models.
    zero: dict[str, Any] = {"stage": launch.zero_stage, "reduce_bucket_size": "auto"}
    if launch.offload_optimizer:
        zero["offload_optimizer"] = offload
    if launch.offload_params:
        zero["offload_param"] = offload
    if launch.zero_stage == 3:
        # The export gathers full weights from the shards (in the training dtype).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.grad_accum_steps,
        "train_batch_size": shape.global_batch,
        "gradient_clipping": shape.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": shape.precision == "bf16"},
        # Our optimizer runs on CPU memory with offload; it is not DeepSpeed's fused CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if launch.deepspeed_config:
        config = deep_merge(config, _read_expert_config(Path(launch.deepspeed_config), config))
    return config


def _read_expert_config(path: Path, ours: dict[str, Any]) -> dict[str, Any]:
    try:
        expert = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"launch.deepspeed_config {path}: no such file; fix the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(
            f"launch.deepspeed_config {path}: not valid JSON ({exc}); fix the file"
        ) from None
    if not isinstance(expert, dict):
        raise PipelineError(f"launch.deepspeed_config {path}: must be a JSON object")
    for key in BATCH_KEYS:
        value = expert.get(key, "auto")
        if value != "auto" and value != ours[key]:
            raise PipelineError(
                f"launch.deepspeed_config {path}: {key}={value} disagrees with the recipe's {ours[key]} "
                f'(micro_batch_size x grad_accum_steps x world size); set it to "auto" or change the recipe'
            )
    return {k: v for k, v in expert.items() if not (k in BATCH_KEYS and v == "auto")}


def fsdp_plugin_kwargs(wrap_classes: list[str]) -> dict[str, Any]:
    """Full sharding (FSDP2) with one unit per transformer block; sharded checkpoints."""
    return {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "transformer_based_wrap",
        "transformer_cls_names_to_wrap": wrap_classes,
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }


def trainer_arguments(
    launch: LaunchConfig, shape: TrainShape, wrap_classes: list[str]
) -> dict[str, Any]:
    """TrainingArguments fields (TRL trainers) for this launch: the same engines as our loops."""
    args: dict[str, Any] = {
        "per_device_train_batch_size": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.grad_accum_steps,
        "max_grad_norm": shape.grad_clip,
        "bf16": shape.precision == "bf16",
    }
    if launch.engine == "deepspeed":
        args["deepspeed"] = deepspeed_config(launch, shape)
    elif launch.engine == "fsdp":
        kwargs = fsdp_plugin_kwargs(wrap_classes)
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {
            "version": kwargs["fsdp_version"],
            "transformer_layer_cls_to_wrap": wrap_classes,
            "reshard_after_forward": True,
            "state_dict_type": kwargs["state_dict_type"],
        }
    return args


def build_accelerator(
    launch: LaunchConfig, shape: TrainShape, wrap_classes: list[str], compile_model: bool = False
) -> Accelerator:
    """An Accelerator for `launch.engine` (gloo on CPU, NCCL on GPUs)."""
    import os

    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import (
        DeepSpeedPlugin,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
        TorchDynamoPlugin,
    )

    kwargs: dict[str, Any] = {
        # Accelerate picks DeepSpeed only when not told cpu=True; on a CPU it must then be told
        # the process-group backend (gloo), which it hands to DeepSpeed's init.
        "cpu": on_cpu and launch.engine != "deepspeed",
        "mixed_precision": "bf16" if shape.precision == "bf16" else "no",
        "gradient_accumulation_steps": shape.grad_accum_steps,
    }
    if launch.engine == "deepspeed":
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(launch, shape))
        if on_cpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif launch.engine == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(wrap_classes))
    if compile_model:
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor")
    accelerator = Accelerator(**kwargs)
    if launch.engine == "fsdp" and on_cpu and accelerator.num_processes > 1:
        # Accelerate turns FSDP on only for GPU process groups; FSDP2 itself shards over gloo on
        # CPU, so select it explicitly there (this is what the CPU test suite exercises).
        # AcceleratorState re-reads PartialState's shared state on every instantiation, so the
        # choice is made on both.
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    return accelerator


def replicates_parameters(launch: LaunchConfig) -> bool:
    """True when every rank holds the full parameters (DDP, ZeRO-1/2), so replicas must agree."""
    return launch.engine == "ddp" or (launch.engine == "deepspeed" and launch.zero_stage < 3)


def replica_digests(accelerator: Accelerator, model) -> list[str]:
    """Each rank's digest of its parameters; under data parallelism they must all be equal."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, param in sorted(accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=accelerator.device)
    gathered = accelerator.gather(mine.unsqueeze(0)).cpu().tolist()
    return [bytes(row).hex() for row in gathered]


def fill_deepspeed_buckets(accelerator: Accelerator, model: Any) -> None:
    """Fill DeepSpeed's "auto" bucket sizes from the model's width squared, as Accelerate does for
    configs with a hidden_size; for configs without one (diffusers) the width is the widest layer's."""
    plugin = accelerator.state.deepspeed_plugin
    config = getattr(model, "config", None)
    if plugin is None or hasattr(config, "hidden_size") or hasattr(config, "hidden_sizes"):
        return
    width = max(max(p.shape[:2]) for p in model.parameters() if p.dim() >= 2)
    sizes = {
        "zero_optimization.reduce_bucket_size": width * width,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * width * width),
        "zero_optimization.stage3_param_persistence_threshold": 10 * width,
    }
    for key, value in sizes.items():
        if plugin.is_auto(key):
            plugin.fill_match(key, must_match=False, **{key: value})


def reshard(model: Any) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward; shard them
    again so parameters (and the EMA that mirrors them) keep one layout."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
