"""Loading at scale for the TRL stages (sft, rlhf): the policy built sharded, the way the
trainer's launch trains it, and streamed in from its directory (pipeline.train.sharded_load), so
that no rank holds the whole model.

The stage makes its TrainingArguments first (they set up the process group and name the
engine), then calls `load_for_trainer`:
- ZeRO-3: the model is partitioned as each module is created (deepspeed.zero.Init with the
  launch's config); deepspeed.initialize keeps that partitioning and partitions what is added
  later (LoRA).
- FSDP2, full fine-tuning: the model is built on the meta device, sharded by Accelerate's own
  FSDP2 preparation with the trainer's plugin, given memory for each rank's shards and filled.
  The trainer's `accelerator.prepare` then finds an FSDP module and keeps it as it is.
- FSDP2 with a LoRA adapter: peft wraps the meta model first (as the trainer would, before its
  Accelerator shards), and the LoRA weights are drawn on the shards by adapter_init. With
  `modules_to_save` the model loads whole (those copies of base modules are not mapped here).
- Anything else (one process, DDP, ZeRO-1/2, QLoRA): None, and the stage loads the model whole.

Reference models that TRL itself creates (GRPO/RLOO with beta > 0 and no adapter) are loaded by
TRL through transformers, not here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pipeline.train.distributed import trainer_fsdp_plugin
from pipeline.train.sharded_load import (
    causal_lm_from_config,
    fill,
    fill_tensor,
    load_zero3,
    materialise,
    on_meta,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_for_trainer(model_dir: Path, args: Any, adapter: Any = None) -> torch.nn.Module | None:
    """model_dir's causal LM sharded as the trainer's arguments `args` train it (under FSDP2
    with `adapter`, the stage's AdapterConfig, already a peft model), or None when this launch
    loads it whole (see the module docstring)."""
    if args is None or args.world_size < 2:
        return None
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is not None and ds.is_zero3():
        log.info("loading %s partitioned over %d ranks (ZeRO-3)", model_dir, args.world_size)
        return load_zero3_for_trainer(model_dir, ds.config)
    if args.fsdp_plugin_args and not (adapter is not None and adapter.modules_to_save):
        log.info("loading %s sharded over %d ranks (FSDP2)", model_dir, args.world_size)
        return load_fsdp2(model_dir, args, adapter)
    return None


def load_zero3_for_trainer(model_dir: Path, ds_config: dict[str, Any]) -> torch.nn.Module:
    """sharded_load.load_zero3 in the process group the TrainingArguments set up, which
    DeepSpeed's own communication layer does not know of yet."""
    import deepspeed
    import torch.distributed as dist

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return load_zero3(model_dir, ds_config)


def load_fsdp2(model_dir: Path, args: Any, adapter: Any = None) -> torch.nn.Module:
    """model_dir's causal LM sharded by FSDP2 exactly as the trainer's Accelerator would shard
    it (the same plugin, built from `args` as pipeline.train.distributed.shard_on_cpu builds
    it), each rank's shards filled from the files. With an adapter, peft wraps the base first
    (as the trainer would) and the LoRA weights are left for adapter_init.seed_adapter."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = trainer_fsdp_plugin(args)
    precision = "bf16" if args.bf16 else "no"
    # What fsdp2_prepare_model reads of an Accelerator; the trainer's own comes later.
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        is_main_process=args.process_index == 0,
        mixed_precision=precision,
        device=args.device,
    )
    model = on_meta(lambda: causal_lm_from_config(model_dir))
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter.peft_config("CAUSAL_LM"))
    model = fsdp2_prepare_model(accelerator, model)
    materialise(model, args.device)
    if adapter is None:
        fill(model, model_dir, fill_tensor)
    else:  # the base's names in the files: no `.base_layer`; LoRA weights are not there
        fill(model.get_base_model(), model_dir, fill_tensor, _base_file_name)
    # The trainer must shard with this plugin: a fresh one would look for the layer classes by
    # name, which FSDP2 has renamed (FSDPQwen2DecoderLayer). See distributed.shard_on_cpu.
    model.pipeline_fsdp_plugin = plugin
    return model


def _base_file_name(name: str) -> str | None:
    """The files' name of a peft-wrapped base model's tensor; None for an adapter weight."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")
