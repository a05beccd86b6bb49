"""The training loop shared by the vae and diffusion stages: one short, linear loop on Accelerate.

The engine (DDP, FSDP, DeepSpeed ZeRO-1/2) comes from the recipe's launch section through
`pipeline.train.distributed`; the loss is the stage's. Batches come from `ImageShards.batch` and every
random number of a loss from `replay_generator(seed, step, rank, micro)`, so resuming from a
checkpoint (model, optimizer, LR schedule and EMA) replays exactly what an uninterrupted run did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.engine import preempt
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.train.optim import OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from data_prep.images import ImageShards

# loss(model, inputs [B, C, H, W], labels [B], generator) -> (loss, extra metrics)
LossFn = Callable[..., tuple["torch.Tensor", dict[str, float]]]


class ImageTrainingConfig(StageConfig):
    """Batch, steps, optimiser, EMA and checkpointing of an image-model training stage."""

    micro_batch_size: int = Field(64, ge=1, description="images per rank per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.0, beta2=0.999)
    schedule: ScheduleConfig = ScheduleConfig(warmup_steps=50)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs with bf16"
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads per process on a CPU; default: torch's/launcher's"
    )
    log_every: int = Field(25, ge=1)
    eval_every: int = Field(250, ge=1)
    eval_batches: int = Field(2, ge=1, description="validation micro batches per rank")
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    distributed = True

    @model_validator(mode="after")
    def _check_schedule(self) -> ImageTrainingConfig:
        if self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below "
                f"max_steps ({self.max_steps})"
            )
        return self


@dataclass
class Trained:
    """What the loop hands back: the prepared model, its EMA (or None) and summary metrics."""

    accelerator: Accelerator
    model: torch.nn.Module
    ema: EMA | None
    summary: dict[str, Any] = field(default_factory=dict)


def train(
    ctx: StageContext,
    cfg: ImageTrainingConfig,
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: tuple[ImageShards, ImageShards],
    ema_decay: float | None,
    wrap_classes: list[str],
) -> Trained:
    """Train `model` on the (train, val) shards for cfg.max_steps, resuming if a checkpoint fits."""
    import torch

    from pipeline.stages.pretrain import resolve_precision
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.optim import lr_factor, param_groups

    train_split, val_split = data
    launch = ctx.recipe.launch_for(ctx.name)
    if ema_decay is not None and launch.engine == "deepspeed" and launch.zero_stage == 3:
        raise PipelineError(
            f"stages.{ctx.name}.launch: ZeRO-3 partitions the parameters the EMA averages; "
            f"use zero_stage 1 or 2, fsdp or ddp"
        )
    shape = TrainShape(
        cfg.micro_batch_size, cfg.grad_accum_steps, ctx.world_size,
        resolve_precision(cfg.precision), cfg.optim.grad_clip,
    )  # fmt: skip
    accelerator = build_accelerator(launch, shape, wrap_classes)
    world, rank = accelerator.num_processes, accelerator.process_index
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.schedule, cfg.max_steps)
    )
    _fill_deepspeed_buckets(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if ema_decay is not None:
        ema = EMA(accelerator.unwrap_model(model).parameters(), ema_decay)
        accelerator.register_for_checkpointing(ema)
    start_step = resume(ctx, accelerator, shape.global_batch)
    params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    ctx.log.info(
        "%.2fM params, %s on %d ranks, %s, %d images/step, steps %d..%d",
        params / 1e6, launch.engine, world, shape.precision, shape.global_batch, start_step,
        cfg.max_steps,
    )  # fmt: skip
    val_rows = _val_rows(len(val_split), cfg.eval_batches * cfg.micro_batch_size, world, rank)

    def evaluate() -> float:
        """Mean loss over this rank's validation images (fixed noise), averaged over ranks."""
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for i, rows in enumerate(val_rows.split(cfg.micro_batch_size)):
                images, labels = _to_device(val_split.take(rows.numpy()), accelerator.device)
                loss, _ = loss_fn(model, images, labels, _generator(ctx.seed, "val", rank, i))
                total += torch.stack([loss.double() * len(rows), total.new_tensor(len(rows))])
        total = accelerator.reduce(total, reduction="sum")
        _reshard(model)
        model.train()
        return (total[0] / total[1]).item()

    def evaluate_ema() -> float | None:
        """The validation loss of the EMA weights (swapped in, then the live ones restored)."""
        if ema is None:
            return None
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        try:
            return evaluate()
        finally:
            ema.restore(model.parameters())

    model.train()
    last_loss, val_loss, val_ema_loss = float("nan"), None, None
    window_start, window_steps = time.perf_counter(), 0
    with ctx.tracker(resume_step=start_step or None) as tracker:
        for step in ctx.progress(range(start_step, cfg.max_steps), desc=f"{ctx.kind} steps"):
            step_loss = torch.zeros((), device=accelerator.device)
            extras: dict[str, float] = {}
            for micro in range(cfg.grad_accum_steps):
                batch = train_split.batch(
                    ctx.seed, step, rank, world, cfg.micro_batch_size, micro, cfg.grad_accum_steps
                )
                images, labels = _to_device(batch, accelerator.device)  # [B, C, H, W], [B]
                # accumulate(): gradients sync on the last micro batch only.
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, metrics = loss_fn(
                        model, images, labels, _generator(ctx.seed, step, rank, micro)
                    )
                    accelerator.backward(loss)
                step_loss += loss.detach() / cfg.grad_accum_steps
                for key, value in metrics.items():
                    extras[key] = extras.get(key, 0.0) + value / cfg.grad_accum_steps
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), opt.grad_clip)
                if opt.grad_clip > 0
                else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(model.parameters())
            window_steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                last_loss = accelerator.reduce(step_loss, reduction="mean").item()
                seconds = time.perf_counter() - window_start
                row = {
                    "train/loss": last_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/images_per_second": window_steps * shape.global_batch / seconds,
                    "train/images": done * shape.global_batch,
                    **{f"train/{k}": v for k, v in extras.items()},
                }
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                tracker.log(row, step=done)
                ctx.log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f images/s", done, cfg.max_steps, last_loss,
                    row["train/lr"], row["train/images_per_second"],
                )  # fmt: skip
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss, val_ema_loss = evaluate(), evaluate_ema()
                row = {"val/loss": val_loss}
                if val_ema_loss is not None:
                    row["val/ema_loss"] = val_ema_loss
                tracker.log(row, step=done)
                ema_note = f" (EMA {val_ema_loss:.4f})" if val_ema_loss is not None else ""
                ctx.log.info("step %d val loss %.4f%s", done, val_loss, ema_note)
            stopping = done < cfg.max_steps and preempt.requested(accelerator)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stopping:
                save_checkpoint(
                    accelerator, ctx.checkpoint_dir, done,
                    {"fingerprint": ctx.fingerprint, "global_batch": shape.global_batch,
                     "world_size": world},
                    keep=cfg.keep_checkpoints,
                )  # fmt: skip
            if stopping:
                raise Preempted(
                    f"stages.{ctx.name}: preempted after step {done}; checkpoint saved, "
                    f"a rerun or requeue resumes from it"
                )
        if val_loss is None:
            val_loss, val_ema_loss = evaluate(), evaluate_ema()
        summary = {
            "train_loss": last_loss,
            "val_loss": val_loss,
            "steps": cfg.max_steps,
            "images_seen": cfg.max_steps * shape.global_batch,
            "params": params,
        }
        if val_ema_loss is not None:
            summary["val_ema_loss"] = val_ema_loss
        summary.update(_replica_check(launch, accelerator, model))
        tracker.summary(summary)
    return Trained(accelerator, model, ema, summary)


class EMA:
    """Exponential moving average of parameters, decay warming up as (1 + n) / (10 + n).

    Works on whatever the engine holds (full tensors under DDP, shards under FSDP); has the
    state_dict / load_state_dict pair Accelerate checkpoints.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in parameters]
        self._stored: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameter, for every parameter."""
        import torch

        self.num_updates += 1
        weight = 1 - self.current_decay()
        with torch.no_grad():
            for shadow, param in zip(self.shadow, parameters, strict=True):
                shadow.lerp_(param.detach(), weight)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        import torch

        with torch.no_grad():
            for shadow, param in zip(self.shadow, parameters, strict=True):
                param.detach().copy_(shadow)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep the live parameters aside (restore() puts them back)."""
        self._stored = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        import torch

        assert self._stored is not None, "restore() without store()"
        with torch.no_grad():
            for kept, param in zip(self._stored, parameters, strict=True):
                param.detach().copy_(kept)
        self._stored = None

    def state_dict(self) -> dict[str, Any]:
        """Full tensors (gathered from FSDP shards: Accelerate calls this on every rank)."""
        full = [s.full_tensor() if _is_dtensor(s) else s for s in self.shadow]
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": full}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each rank keeps its own part of the full tensors, on its own device."""
        from torch.distributed.tensor import distribute_tensor

        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [
            distribute_tensor(
                full.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None
            )
            if _is_dtensor(mine)
            else full.to(mine.device)
            for full, mine in zip(state["shadow"], self.shadow, strict=True)
        ]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def resume(ctx: StageContext, accelerator: Accelerator, global_batch: int) -> int:
    """Load the newest checkpoint of this configuration; the step to continue from (0: none)."""
    from pipeline.train.checkpoint import latest_checkpoint

    found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint)
    if not found:
        return 0
    path, meta = found
    if meta["global_batch"] != global_batch:
        raise PipelineError(
            f"stages.{ctx.name}: checkpoint {path.name} used a global batch of "
            f"{meta['global_batch']} images, this launch gives {global_batch}; keep "
            f"nproc*micro_batch_size*grad_accum_steps equal to resume, or rerun with --force"
        )
    accelerator.load_state(str(path))
    ctx.log.info("resuming from %s (step %d)", path.name, meta["step"])
    return int(meta["step"])


def ema_state_dict(trained: Trained) -> dict[str, Any]:
    """The full state dict with the EMA weights (gathered from shards; every rank calls this)."""
    accelerator, model, ema = trained.accelerator, trained.model, trained.ema
    if ema is None:
        return accelerator.get_state_dict(model)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        # Copies: the state dict shares storage with the parameters restore() overwrites.
        return {k: v.detach().clone() for k, v in accelerator.get_state_dict(model).items()}
    finally:
        ema.restore(model.parameters())


def _replica_check(launch: Any, accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """Under data parallelism every rank must end with the same weights; their digests."""
    from pipeline.train.distributed import replica_digests, replicates_parameters

    if not replicates_parameters(launch):
        return {}
    digests = replica_digests(accelerator, model)
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: parameter digests {digests}")
    return {"replica_digests": digests}


def _fill_deepspeed_buckets(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Fill DeepSpeed's "auto" bucket sizes as Accelerate does for transformers models (from the
    width squared); diffusers configs have no hidden_size, so the width is the widest layer's."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
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


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward; shard them
    again so parameters (and the EMA that mirrors them) keep one layout."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _val_rows(num_images: int, per_rank: int, world: int, rank: int) -> torch.Tensor:
    """This rank's validation rows: an equal share of the first images of the val split."""
    import torch

    usable = min(num_images, per_rank * world) // world * world
    if usable == 0:
        raise PipelineError(
            f"the val split has {num_images} images, fewer than the {world} ranks; "
            f"raise val_fraction in the images stage"
        )
    return torch.arange(usable)[rank::world]


def _to_device(batch: tuple[Any, Any], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    images, labels = batch
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def _generator(*key: object) -> torch.Generator:
    from pipeline.train.optim import replay_generator

    return replay_generator(*key)
