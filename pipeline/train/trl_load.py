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
  Accelerator shards), and the LoRA weights are drawn on the shards by adapter_init. The copies
  peft keeps of `modules_to_save` (and a reward model's score head) are filled from the same
  file tensors as the modules they copy.
- Anything else (one process, DDP, ZeRO-1/2, QLoRA, and ZeRO-3 with `modules_to_save`, whose
  copies peft would make of partitioned modules): None, and the stage loads the model whole.

The reward stage loads its sequence classifier the same way (`build`: `sequence_classifier`);
its score head is not in a causal LM's files and is drawn by adapter_init.seed_head. The
reference model that TRL itself creates (GRPO/RLOO with beta > 0 and no adapter) comes from
here too: `sharded_reference` hands TRL's model factory this loader while the trainer is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pipeline.train.adapter_init import bare_name
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


def load_for_trainer(
    model_dir: Path,
    args: Any,
    adapter: Any = None,
    build: Callable[[], torch.nn.Module] | None = None,
    what: str = "",
) -> torch.nn.Module | None:
    """model_dir's model (`build()`, default its causal LM) sharded as the trainer's arguments
    `args` train it (under FSDP2 with `adapter`, the stage's AdapterConfig, already a peft
    model), or None when this launch loads it whole (see the module docstring). `what` names
    the model in the log line."""
    if args is None or args.world_size < 2:
        return None
    build = build or (lambda: causal_lm_from_config(model_dir))
    task_type = getattr(build, "task_type", "CAUSAL_LM")
    copies = adapter is not None and (adapter.modules_to_save or task_type == "SEQ_CLS")
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is not None and ds.is_zero3():
        if copies:  # peft would deepcopy partitioned modules: DeepSpeed partitions at initialize
            return None
        log.info(
            "loading %s%s partitioned over %d ranks (ZeRO-3)", what, model_dir, args.world_size
        )
        return load_zero3_for_trainer(model_dir, ds.config, build)
    if args.fsdp_plugin_args:
        log.info("loading %s%s sharded over %d ranks (FSDP2)", what, model_dir, args.world_size)
        return load_fsdp2(model_dir, args, adapter, build)
    return None


def sequence_classifier(model_dir: Path) -> Callable[[], torch.nn.Module]:
    """A `build` for load_for_trainer: model_dir's model with a one-output score head (a reward
    model), from its config alone, in fp32."""

    def build() -> torch.nn.Module:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir, num_labels=1)
        return transformers.AutoModelForSequenceClassification.from_config(
            config, dtype=torch.float32
        )

    build.task_type = "SEQ_CLS"  # type: ignore[attr-defined]
    return build


@contextmanager
def sharded_reference(trainer_module: Any, model_dir: Path, args: Any) -> Iterator[None]:
    """While a GRPO or RLOO trainer is built: the reference model it creates (beta > 0, no
    adapter) is model_dir's, loaded by load_for_trainer; TRL's own factory where that is None.
    The trainer's later `prepare_fsdp` keeps an FSDP module and `prepare_deepspeed` keeps
    ZeRO-3's partitions, as for the policy."""
    original = trainer_module.create_model_from_path

    def create(model_id: str, **kwargs: Any) -> Any:
        loaded = load_for_trainer(model_dir, args, what="reference model ")
        return loaded if loaded is not None else original(model_id, **kwargs)

    trainer_module.create_model_from_path = create
    try:
        yield
    finally:
        trainer_module.create_model_from_path = original


def load_zero3_for_trainer(
    model_dir: Path, ds_config: dict[str, Any], build: Callable[[], torch.nn.Module] | None = None
) -> torch.nn.Module:
    """sharded_load.load_zero3 in the process group the TrainingArguments set up, which
    DeepSpeed's own communication layer does not know of yet."""
    import deepspeed
    import torch.distributed as dist

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return load_zero3(model_dir, ds_config, build, _file_name)


def load_fsdp2(
    model_dir: Path,
    args: Any,
    adapter: Any = None,
    build: Callable[[], torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """model_dir's model sharded by FSDP2 exactly as the trainer's Accelerator would shard it
    (the same plugin, built from `args` as pipeline.train.distributed.shard_on_cpu builds it),
    each rank's shards filled from the files. With an adapter, peft wraps the base first (as
    the trainer would) and the LoRA weights are left for adapter_init.seed_adapter."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    build = build or (lambda: causal_lm_from_config(model_dir))
    plugin = trainer_fsdp_plugin(args)
    precision = "bf16" if args.bf16 else "no"
    # What fsdp2_prepare_model reads of an Accelerator; the trainer's own comes later.
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        is_main_process=args.process_index == 0,
        mixed_precision=precision,
        device=args.device,
    )
    model = on_meta(build)
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter.peft_config(getattr(build, "task_type", "CAUSAL_LM")))
    model = fsdp2_prepare_model(accelerator, model)
    materialise(model, args.device)
    base = model if adapter is None else model.get_base_model()
    fill(base, model_dir, fill_tensor, _file_name)
    # The trainer must shard with this plugin: a fresh one would look for the layer classes by
    # name, which FSDP2 has renamed (FSDPQwen2DecoderLayer). See distributed.shard_on_cpu.
    model.pipeline_fsdp_plugin = plugin
    return model


def _file_name(name: str) -> str | None:
    """The files' name of a model tensor, peft-wrapped or not (adapter_init.bare_name); None
    for what a causal LM's files do not hold: an adapter weight, a reward model's score head."""
    if ".lora_" in name or name.split(".")[0] == "score":
        return None
    return bare_name(name)
