"""Loading at scale: a model directory's weights streamed into a model that is already sharded
over the ranks (FSDP2 or DeepSpeed ZeRO-3), so that no rank ever holds the whole model.

`load_sharded` builds the model without its memory, in the layout training uses (FSDP2: the
parameters on the meta device, sharded by `accelerator.prepare` itself, then given memory for
each rank's shard only; ZeRO-3: partitioned as each module is created, by deepspeed.zero.Init
with the launch's config), then fills it one tensor at a time: rank 0 reads, for each rank, only
the part of the tensor that rank keeps (FSDP2: its rows of dim 0; ZeRO-3: its range of the
flattened tensor) and sends it there. A rank's peak is its own shard plus about one tensor's
part. Without a sharding engine (DDP, ZeRO-1/2, one process) every rank gets the whole model.
The TRL stages (sft, rlhf), whose trainer prepares the model, load through pipeline.train.trl_load.

Each tensor is read through its own `safe_open`: safetensors maps the file, and the pages a read
touches stay in the process's RSS for as long as the mapping lives, so a handle kept open over
the whole load would make the whole file resident on rank 0.

Weights load as fp32 master weights whatever dtype they are stored in (under ZeRO-3, in the dtype
DeepSpeed partitions in: bf16 when the launch trains in bf16, as with transformers' own loading).
Tied parameters are filled once, from whichever of their names the files hold; buffers keep
the values the constructor computed (rotary inv_freq) unless the files hold them. A name or
shape the files lack is an error raised on every rank before any rank waits in a collective.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import PipelineError
from pipeline.train.distributed import engine_layout, hf_zero3_off
from pipeline.train.weight_files import Source, read_tensor, weight_files

# torch, transformers, safetensors, deepspeed: imported where used (seconds to import).
if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def load_sharded(
    model_dir: Path,
    accelerator: Accelerator,
    build: Callable[[], torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """The model `build` makes (default: model_dir's causal LM from its config), sharded as
    `accelerator` trains it and holding model_dir's weights. Build the optimizer over it and
    call `accelerator.prepare(model, optimizer)` as usual: prepare keeps this layout."""
    build = build or (lambda: causal_lm_from_config(model_dir))
    layout = engine_layout(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if layout == "deepspeed" and plugin.zero_stage == 3:
        return load_zero3(model_dir, plugin.deepspeed_config, build)
    model = on_meta(build)
    if layout == "fsdp":
        model = accelerator.prepare(model)  # shards the meta parameters: FSDP2's own layout
    materialise(getattr(model, "_orig_mod", model), accelerator.device)
    fill(getattr(model, "_orig_mod", model), model_dir, fill_tensor)
    return model


def load_zero3(
    model_dir: Path,
    ds_config: dict[str, Any],
    build: Callable[[], torch.nn.Module] | None = None,
    file_name: Callable[[str], str | None] = lambda name: name,
) -> torch.nn.Module:
    """`build()` (default: model_dir's causal LM) partitioned by ZeRO-3 as `ds_config` trains
    it, holding model_dir's weights (`file_name`: as for `fill`)."""
    with _zero3_construction(ds_config):
        model = (build or (lambda: causal_lm_from_config(model_dir)))()
    fill(_tied(model), model_dir, _fill_zero3, file_name)
    return model


def causal_lm_from_config(model_dir: Path) -> torch.nn.Module:
    """model_dir's causal LM built from its config.json alone, in fp32 (no weights read)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` with its parameters on the meta device (no memory) and its buffers computed
    for real (rotary inv_freq is not in a checkpoint: it must come from the constructor). The
    loader's starting point, and the twin a stage describes the model by (counts, FLOPs)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    return _tied(model)  # the context registers each parameter anew, which unties them


def _tied(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its tied parameters (lm_head and the embedding) one parameter again, as
    transformers ties them after loading: its init, which ties them, was skipped or undone."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@contextmanager
def _zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Partition each module as it is created (deepspeed.zero.Init, configured as the launch
    trains) without initialising it: the weights replace any init. transformers' own ZeRO-3
    switch (which Accelerate turns on) is off meanwhile: it would wrap from_config in a second
    zero.Init and then gather every module once more to initialise it. The whole tensors
    DeepSpeed creates before partitioning are handed back to the system module by module."""
    import deepspeed
    import torch
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    hooks = torch.nn.modules.module.register_module_module_registration_hook(_release_freed)
    try:
        # prevent_arange_dtype_change must come first: zero.Init would build rotary buffers
        # in its own dtype (bf16 under a bf16 launch).
        with (
            hf_zero3_off(),
            no_init_weights(),
            prevent_arange_dtype_change(),
            deepspeed.zero.Init(config_dict_or_path=ds_config),
        ):
            yield
    finally:
        hooks.remove()


def _release_freed(*_: Any) -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim, else a no-op)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Give the meta parameters (each rank's shards, under FSDP2) uninitialised memory on
    `device`; buffers keep their computed values (to_empty would leave them uninitialised)."""
    import torch

    saved = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    # FSDP2 swaps its sharded DTensors in place, keeping the parameter objects (ties included);
    # plain parameters are replaced by new ones, one per module, so ties are made again.
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in saved.items():
            model.get_buffer(name).copy_(value)
    _tied(model)


def fill(
    model: torch.nn.Module,
    model_dir: Path,
    fill_one: Callable[..., None],
    file_name: Callable[[str], str | None] = lambda name: name,
) -> None:
    """Fill every parameter (and each persistent buffer the files hold) from model_dir, one
    tensor at a time. Rank 0 alone reads the directory and matches file tensors to model ones;
    a problem it finds is raised on every rank, before any rank waits in a collective.
    `file_name(name)` is the files' name of a model tensor, None for one they cannot hold (a
    LoRA weight: left as it is)."""
    import torch
    import torch.distributed as dist

    plan = list(_targets(model, file_name))
    rank = dist.get_rank() if dist.is_initialized() else 0
    agreed: list[Any] = [None, None]
    if rank == 0:
        try:
            agreed = [_match(plan, model_dir), None]
        except PipelineError as exc:
            agreed = [None, str(exc)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(agreed, src=0)
    sources, problem = agreed
    if problem is not None:
        raise PipelineError(problem)
    with torch.no_grad():
        for (_, _, tensor), source in zip(plan, sources, strict=True):
            if source is not None:
                fill_one(tensor, source, rank)


def _match(plan: list[tuple[list[str], bool, Any]], model_dir: Path) -> list[Source | None]:
    """For each model tensor, the (file, name) that fills it: the first of its names the files
    hold (None for a buffer they lack, which keeps its computed value)."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    sources = [next(((files[n], n) for n in names if n in files), None) for names, _, _ in plan]
    missing = [
        names[0]
        for (names, is_param, _), src in zip(plan, sources, strict=True)
        if is_param and not src
    ]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PipelineError(
            f"model.path {model_dir}: the safetensors files hold no weights for "
            f"{', '.join(missing[:5])}{more}; give a checkpoint of this architecture saved "
            f"with save_pretrained"
        )
    for (_, _, tensor), source in zip(plan, sources, strict=True):
        if source is None:
            continue
        with safe_open(source[0], framework="pt") as handle:
            stored = tuple(handle.get_slice(source[1]).get_shape())
        expected = tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3: the full shape
        if stored != expected:
            raise PipelineError(
                f"model.path {model_dir}: tensor {source[1]} has shape {stored} in "
                f"{source[0].name}, the model built from config.json expects {expected}; "
                f"the config and the weights disagree"
            )
    return sources


def _targets(
    model: torch.nn.Module, file_name: Callable[[str], str | None]
) -> Iterator[tuple[list[str], bool, torch.Tensor]]:
    """(every name of a tensor, whether it is a parameter, the tensor) for each distinct
    parameter and persistent buffer, in the model's order (the same on every rank). A
    checkpoint of the base model alone (GPT-2's hub files) names tensors without its prefix."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names: dict[int, list[str]] = {}
    tensors: dict[int, tuple[bool, Any]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        tensors[id(param)] = (True, param)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is None or name in module._non_persistent_buffers_set:
                continue
            names.setdefault(id(buffer), []).append(f"{module_name}.{name}".lstrip("."))
            tensors[id(buffer)] = (False, buffer)
    for key, aliases in names.items():
        is_param, tensor = tensors[key]
        aliases = [n for n in map(file_name, aliases) if n is not None]
        bare = [a.removeprefix(prefix) for a in aliases if prefix != "." and a.startswith(prefix)]
        if aliases:
            yield aliases + bare, is_param, tensor


def fill_tensor(tensor: torch.Tensor, source: Source, rank: int) -> None:
    """FSDP2's DTensor shard or a whole tensor (replicated buffers, DDP), from rank 0."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        _fill_dtensor(tensor, source, rank)
    else:
        _broadcast_into(tensor, source, rank)


def _broadcast_into(target: torch.Tensor, source: Source, rank: int) -> None:
    """Rank 0 reads the whole tensor into `target`; every other rank receives it."""
    import torch.distributed as dist

    if rank == 0:
        target.copy_(read_tensor(source))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(target, src=0)


def _fill_dtensor(param: Any, source: Source, rank: int) -> None:
    """One FSDP2 parameter. Its layout (dim 0 cut into ceil(n / world)-row chunks, one per rank
    of a 1-D mesh) lets rank 0 read and send each rank only its rows; any other layout is
    filled from a broadcast of the whole tensor."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    local, mesh = param.to_local(), param.device_mesh
    owners = mesh.mesh.flatten().tolist()
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),) or not _whole_world(owners):
        full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
        _broadcast_into(full, source, rank)
        local.copy_(distribute_tensor(full, mesh, param.placements).to_local())
        return
    spans = _spans(param.shape[0], math.ceil(param.shape[0] / len(owners)), len(owners))
    if rank != 0:
        start, end = spans[owners.index(rank)]
        assert local.shape[0] == end - start, f"{source[1]}: an FSDP2 shard of unexpected size"
    _send_parts(local, owners, spans, lambda start, end: read_tensor(source, start, end), rank)


def _fill_zero3(param: Any, source: Source, rank: int) -> None:
    """One ZeRO-3 parameter. Its partition on rank i is elements [i * size, (i + 1) * size) of
    the flattened tensor (the last one padded), so rank 0 reads and sends each rank only those;
    a partition swapped to NVMe or quantised is filled through a gather instead. A buffer
    (never partitioned) is broadcast."""
    import deepspeed
    import torch.distributed as dist

    if not hasattr(param, "ds_id"):
        _broadcast_into(param, source, rank)
        return
    partition, group = param.ds_tensor, param.ds_process_group
    owners = [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]
    plain = partition.final_location is None and not hasattr(partition, "ds_quant_scale")
    if not plain or not _whole_world(owners):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(read_tensor(source))
        return
    shape, size = tuple(param.ds_shape), partition.ds_numel
    row = math.prod(shape[1:]) if len(shape) > 1 else 1  # elements per row of dim 0

    def flat(start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, from the rows that hold them."""
        if not shape:
            return read_tensor(source).reshape(-1)[start:end]
        first = start // row
        rows = read_tensor(source, first, math.ceil(end / row)).reshape(-1)
        return rows[start - first * row : end - first * row]

    _send_parts(partition, owners, _spans(param.ds_numel, size, len(owners)), flat, rank)


def _whole_world(owners: list[int]) -> bool:
    """Whether `owners` are all the ranks (then every rank takes the same path)."""
    import torch.distributed as dist

    return sorted(owners) == list(range(dist.get_world_size()))


def _spans(total: int, size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` consecutive chunks of `size` in `total` (the last ones short)."""
    return [(min(i * size, total), min((i + 1) * size, total)) for i in range(parts)]


def _send_parts(
    local: torch.Tensor,
    owners: list[int],
    spans: list[tuple[int, int]],
    read_part: Callable[[int, int], torch.Tensor],
    rank: int,
) -> None:
    """Rank 0 reads owner i's span and sends it there, one span resident at a time; each rank
    receives its own span into the head of `local` (its shard or partition)."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        for owner, (start, end) in zip(owners, spans, strict=True):
            if end == start:
                continue
            part = read_part(start, end).to(local.device, local.dtype)
            if owner == 0:
                local[: end - start].copy_(part)
            else:
                dist.send(part.contiguous(), dst=owner)
            del part
        return
    start, end = spans[owners.index(rank)]
    if end == start:
        return
    target = local[: end - start]
    buffer = target if target.is_contiguous() else torch.empty_like(target)
    dist.recv(buffer, src=0)
    if buffer is not target:
        target.copy_(buffer)
