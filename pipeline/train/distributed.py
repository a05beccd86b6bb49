"""Parallelism is chosen here and only here: the recipe's launch section becomes Accelerate
plugins (our own loops) or TrainingArguments fields (TRL trainers), from one DeepSpeed config
builder, so batch size, accumulation and world size can never disagree between the two.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.checks import DEEPSPEED_BATCH_KEYS, deepspeed_batch_problem
from pipeline.engine.config import LaunchConfig, deep_merge
from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    from accelerate import Accelerator

# Keys whose values must agree with the recipe; "auto" lets DeepSpeed/Accelerate fill them.


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
        config = deep_merge(config, _read_expert_config(Path(launch.deepspeed_config), shape))
    return config


def _read_expert_config(path: Path, shape: TrainShape) -> dict[str, Any]:
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
    problem = deepspeed_batch_problem(
        expert, shape.micro_batch_size, shape.grad_accum_steps, shape.world_size
    )
    if problem is not None:
        raise PipelineError(f"launch.deepspeed_config {path}: {problem}")
    return {k: v for k, v in expert.items() if not (k in DEEPSPEED_BATCH_KEYS and v == "auto")}


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


# How a checkpoint directory (Accelerate's save_state) holds the model, by engine.
DEEPSPEED_TAG = "pytorch_model"  # DeepSpeed's ZeRO files under this tag
FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"  # DCP shards


def engine_layout(accelerator: Accelerator) -> str:
    """How this launch saves the model: "deepspeed", "fsdp" (DCP shards) or "full" (one file)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "fsdp" if kind == DistributedType.FSDP else "full"


def checkpoint_layout(path: Path) -> str:
    """How the checkpoint at `path` holds the model (see engine_layout)."""
    if (path / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    return "fsdp" if (path / FSDP_MODEL_DIR).is_dir() else "full"


def load_resharded(accelerator: Accelerator, path: Path) -> None:
    """Load a checkpoint whose layout (full tensors or FSDP2 shards) is not this launch's: model
    and optimizer through torch's state-dict API (DCP reshards the shards it reads), then the
    registered objects (schedule, EMA) and this rank's RNG state as Accelerate saved them."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = accelerator._models[0], plain_optimizer(accelerator._optimizers[0])
    if checkpoint_layout(path) == "fsdp":
        import torch.distributed.checkpoint as dcp

        model_state = {"model": get_model_state_dict(model)}
        dcp.load(model_state, checkpoint_id=str(path / FSDP_MODEL_DIR))
        set_model_state_dict(model, model_state["model"])
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=str(path / FSDP_OPTIMIZER_DIR))
        set_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
    else:
        full = StateDictOptions(full_state_dict=True)
        module = accelerator.unwrap_model(model)
        set_model_state_dict(model, _full_model_state(module, path), options=full)
        optim_state = _full_optimizer_state(module, optimizer, path)
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    load_accelerator_state(str(path), [], [], [], [], accelerator.process_index)
    for index, obj in enumerate(accelerator._custom_objects):
        load_custom_state(obj, str(path), index)


def plain_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _full_model_state(module: Any, path: Path) -> dict[str, Any]:
    """The saved full state dict by parameter name, with the tied names safetensors left out."""
    from safetensors.torch import load_file

    saved = {k.removeprefix("module."): v for k, v in load_file(path / "model.safetensors").items()}
    aliases: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in saved]
        saved.update({n: saved[present[0]] for n in names if present and n not in saved})
    return saved


def _full_optimizer_state(module: Any, optimizer: Any, path: Path) -> dict[str, Any]:
    """The saved optimizer state keyed by parameter name instead of position: the optimizer was
    built the same way, so position k of the saved groups is position k of this one's."""
    import torch

    saved = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
    names = {id(param): name for name, param in module.named_parameters()}
    ours = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    theirs = [i for group in saved["param_groups"] for i in group["params"]]
    by_id = dict(zip(theirs, ours, strict=True))
    return {
        "state": {by_id[i]: state for i, state in saved["state"].items()},
        "param_groups": [
            {**group, "params": [by_id[i] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }


def shard_on_cpu(trainer: Any) -> None:
    """Make `engine: fsdp` shard a TRL trainer's model on CPUs too, as `build_accelerator` does for
    our loops: Accelerate selects FSDP only for GPU process groups and would run DDP instead.
    A model that trl_load already sharded brings the plugin that sharded it (its wrap policy
    resolved on the unsharded classes); the trainer takes that one, on GPUs too."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    loaded = getattr(trainer.model, "pipeline_fsdp_plugin", None)
    if loaded is not None and trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin = loaded
    plugin_args = trainer.args.fsdp_plugin_args
    if torch.cuda.is_available() or not plugin_args or trainer.accelerator.num_processes < 2:
        return
    plugin = loaded or trainer_fsdp_plugin(trainer.args)
    PartialState().distributed_type = DistributedType.FSDP
    trainer.accelerator.state.distributed_type = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def trainer_fsdp_plugin(args: Any) -> Any:
    """The FSDP2 plugin a TRL trainer's arguments ask for, with their mixed precision."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if args.bf16:
        plugin.set_mixed_precision("bf16")
    return plugin


@contextmanager
def hf_zero3_off() -> Iterator[None]:
    """transformers' ZeRO-3 switch (set by TrainingArguments or Accelerate for a ZeRO-3 launch)
    off for a while: `from_pretrained` and `from_config` then build a model whole, not inside
    a deepspeed.zero.Init of their own. The launch's switch is restored afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    switch = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = switch
