"""Resumable training state: atomic, checksummed, the newest verified checkpoint wins.

A checkpoint is written by every rank through `accelerator.save_state` (or, asynchronously for
FSDP2, through `torch.distributed.checkpoint.async_save`) into a temporary directory; once every
shard is on disk, rank 0 records checksums and provenance (the stage config, the code and
package versions) in `meta.json` and renames it to `step_NNNNNNNN/`. A directory without a
valid meta.json (a crash mid-save, an unfinished asynchronous write) is never loaded. A
checkpoint loads on any number of ranks (`load_checkpoint` reshards).
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine import diskfull, faults
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, checksum_tree, sha256_file
from pipeline.engine.rundir import PARTIAL_CHECKPOINT_PREFIX
from pipeline.train.distributed import (
    DEEPSPEED_TAG,
    FSDP_MODEL_DIR,
    FSDP_OPTIMIZER_DIR,
    plain_optimizer,
)
from pipeline.train.provenance import provenance

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("pipeline.train.checkpoint")
META = "meta.json"
# The asynchronous save still being written (at most one) and the thread that completes it.
_pending: Future[None] | None = None
_executor: ThreadPoolExecutor | None = None


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    meta: dict[str, Any],
    keep: int,
    config: dict[str, Any] | None = None,
    asynchronous: bool = False,
) -> Path:
    """Save the full training state after `step` optimizer steps; keep the newest `keep`.

    `config` is the resolved stage config (JSON form), recorded with the code and package
    versions so that a checkpoint says what made it. `asynchronous` (FSDP2; other engines save
    synchronously): return once the shards are copied to CPU memory and write them in the
    background; meta.json and the rename follow the write, so until then the checkpoint does
    not exist. Any save first waits for the pending one.
    """
    from pipeline.train.distributed import engine_layout

    global _pending
    wait_for_checkpoint()
    final = step_dir(root, step)
    tmp = root / f"{PARTIAL_CHECKPOINT_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    record = {**meta, "step": step, "provenance": provenance(config)}
    main = accelerator.is_main_process
    faults.point(root.parent.name, "checkpoint_start")
    if asynchronous and engine_layout(accelerator) == "fsdp":
        with _writing(final, tmp, main):
            writes = save_fsdp_async(accelerator, tmp)
        accelerator.wait_for_everyone()  # every rank's own files are written
        _pending = _writer().submit(_complete, writes, main, tmp, final, record, keep)
        return final
    with _writing(final, tmp, main):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    faults.point(root.parent.name, "checkpoint_save")
    _complete([], main, tmp, final, record, keep)
    accelerator.wait_for_everyone()
    return final


def wait_for_checkpoint() -> None:
    """Block until the pending asynchronous save, if any, is written (and, on rank 0, has its
    meta.json and final name); its error, if it failed, is raised here."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending.result()


def _complete(
    writes: list[Future[Any]],
    main: bool,
    tmp: Path,
    final: Path,
    record: dict[str, Any],
    keep: int,
) -> None:
    """After the shard writes (rank 0's futures finish only when every rank's are on disk):
    rank 0 records the checksums in meta.json, renames the directory and drops old ones."""
    with _writing(final, tmp, main):
        for write in writes:
            write.result()
        if not main:
            return
        atomic_write_json(tmp / META, {**record, "files": checksum_tree(tmp)})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _writing(final: Path, tmp: Path, main: bool) -> Any:
    """A full disk while writing checkpoint `final`: remove its temporary directory (rank 0) and
    stop with one line naming the checkpoint a rerun resumes from; older ones are untouched."""
    previous = list_checkpoints(final.parent)
    resume = f" from {previous[-1].name}" if previous else " (no checkpoint yet: from step 0)"
    return diskfull.writing(
        f"checkpoint {final.name}", final.parent, tmp if main else None,
        hint=" (or lower keep_checkpoints)", resume=resume,
    )  # fmt: skip


def _writer() -> ThreadPoolExecutor:
    """The thread that completes asynchronous saves (one at a time, in order)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
    return _executor


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def verify_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's meta when every file is present with its checksum, else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for rel, info in meta.get("files", {}).items():
        file = path / rel
        if (
            not file.is_file()
            or file.stat().st_size != info["bytes"]
            or sha256_file(file) != info["sha256"]
        ):
            log.warning(
                "checkpoint %s: %s is damaged; falling back to an older one", path.name, rel
            )
            return None
    return meta


def latest_checkpoint(
    root: Path, fingerprint: str, max_step: int | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint (at most `max_step` steps in) that verifies and was written by the same
    stage configuration."""
    for path in reversed(list_checkpoints(root)):
        if max_step is not None and int(path.name.removeprefix("step_")) > max_step:
            continue
        meta = verify_checkpoint(path)
        if meta is None:
            continue
        if meta.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s: written by a different config; ignoring it", path.name)
            continue
        return path, meta
    return None


def load_checkpoint(accelerator: Accelerator, path: Path, meta: dict[str, Any], stage: str) -> None:
    """Load the checkpoint at `path` into this launch, resharding it when another number of ranks
    (or, at one rank, another layout) wrote it: DCP for FSDP2 shards and full tensors, DeepSpeed
    universal checkpoints for ZeRO partitions."""
    from pipeline.train.distributed import checkpoint_layout, engine_layout, load_resharded

    saved, ours = checkpoint_layout(path), engine_layout(accelerator)
    world, now = int(meta.get("world_size", accelerator.num_processes)), accelerator.num_processes
    if saved == ours and (saved != "deepspeed" or world == now):
        accelerator.load_state(str(path))  # FSDP2 shards at another world size: DCP reshards
    elif saved == ours:
        load_universal(accelerator, path)
    elif "deepspeed" in (saved, ours):
        raise PipelineError(
            f"stages.{stage}: checkpoint {path.name} holds {saved} state from {world} rank(s), "
            f"this launch ({now} rank(s)) holds {ours} state; resume with the engine that wrote "
            f"it, or rerun with --force to start over"
        )
    else:
        load_resharded(accelerator, path)


def load_universal(accelerator: Accelerator, path: Path) -> None:
    """Load a ZeRO checkpoint written by another number of ranks: rank 0 converts it to a
    DeepSpeed universal checkpoint (ds_to_universal) beside it, every rank loads its own
    partition from that, and the conversion is removed again."""
    import contextlib
    import io
    import shutil
    from argparse import Namespace

    import torch
    from deepspeed.checkpoint import ds_to_universal

    converted = path.parent / f".universal_{path.name}"
    if accelerator.is_main_process:
        shutil.rmtree(converted, ignore_errors=True)
        converted.mkdir()
        for item in path.iterdir():  # the schedule, EMA and RNG files Accelerate reads itself
            if item.is_file():
                shutil.copy2(item, converted / item.name)
        args = Namespace(
            input_folder=str(path / DEEPSPEED_TAG), output_folder=str(converted / DEEPSPEED_TAG),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    accelerator.wait_for_everyone()
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine._config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(converted))
        # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the first group's
        # hyperparameters (the no-decay group would decay) and one shared `step` tensor (which
        # AdamW then advances once per group): put each group's own back, one step each.
        base = engine.optimizer.optimizer
        saved = torch.load(converted / DEEPSPEED_TAG / "zero" / "optimizer_state.pt",
                           map_location="cpu", weights_only=False)["param_groups"]  # fmt: skip
        for group, own in zip(base.param_groups, saved, strict=True):
            group.update({k: v for k, v in own.items() if k != "params"})
        for state in base.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    finally:
        engine._config.load_universal_checkpoint = False
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(converted, ignore_errors=True)


_WRITER_GROUPS: list[Any] = []  # one gloo group per background writer, made on first use


def save_fsdp_async(accelerator: Accelerator, path: Path) -> list[Any]:
    """Start writing the FSDP2 model and optimizer shards to `path` in the background, in the
    layout `save_state` gives (so loading, resharding included, is unchanged); the schedule, EMA
    and RNG files are written now. The shards are copied to CPU memory before this returns, so
    training may go on; the futures complete when every rank's shards are on disk."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state, save_custom_state
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if not _WRITER_GROUPS:
        # Each writer thread has its own group: its collectives never interleave with the
        # training thread's, or with the other writer's, in different orders on different ranks.
        _WRITER_GROUPS.extend(dist.new_group(backend="gloo") for _ in range(2))
    model, optimizer = accelerator._models[0], plain_optimizer(accelerator._optimizers[0])
    parts = {
        FSDP_MODEL_DIR: {"model": get_model_state_dict(model)},
        FSDP_OPTIMIZER_DIR: {"optimizer": get_optimizer_state_dict(model, optimizer)},
    }
    futures = []
    for (name, state), group in zip(parts.items(), _WRITER_GROUPS, strict=True):
        (path / name).mkdir(parents=True, exist_ok=True)
        futures.append(dcp.async_save(state, checkpoint_id=path / name, process_group=group))
    process, step, scaler = accelerator.process_index, accelerator.step, accelerator.scaler
    save_accelerator_state(str(path), [], [], [], [], process, step, scaler)
    for index, obj in enumerate(accelerator._custom_objects):
        save_custom_state(obj, str(path), index)
    return futures
