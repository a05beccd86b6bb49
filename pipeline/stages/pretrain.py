"""Pretraining on token shards: one short, linear loop on Accelerate for every engine and family.

The engine (DDP, FSDP, DeepSpeed ZeRO) comes from the recipe's launch section through
`pipeline.train.distributed`; the objective (causal, masked, span corruption, MoE) comes from the model
family through `pipeline.models`. Batches and objective randomness are pure functions of
(seed, step, rank, micro step), so resuming from a checkpoint replays exactly the data an
uninterrupted run would have seen, and the resumed run ends with the same weights.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.engine import preempt
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.models.causal_lm import ModelConfig
from pipeline.train.optim import OptimConfig, ScheduleConfig


class Config(StageConfig):
    kind: Literal["pretrain"]
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(256, ge=8)
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs with bf16"
    )
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model (inductor)")
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1, description="validation micro batches per rank")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    distributed = True

    @model_validator(mode="after")
    def _check_schedule(self) -> Config:
        if self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        return self


def parameter_counts(model: Any, experts_per_token: int, num_experts: int) -> dict[str, int]:
    """Total, non-embedding and active non-embedding parameter counts (scaling-law N).

    Non-embedding (Kaplan et al. 2020) leaves out every nn.Embedding table (tokens, positions,
    token types, relative-position buckets) and the projection to the vocabulary; active counts
    each MoE expert at experts_per_token / num_experts, the share a token passes through.
    """
    import torch

    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    tables.append(model.get_output_embeddings() or torch.nn.Module())
    vocabulary = {id(p) for table in tables for p in table.parameters()}
    counts = {"params": 0, "non_embedding_params": 0, "active_non_embedding_params": 0}
    for name, param in model.named_parameters():
        counts["params"] += param.numel()
        if id(param) not in vocabulary:
            counts["non_embedding_params"] += param.numel()
            share = (experts_per_token, num_experts) if ".experts." in name else (1, 1)
            counts["active_non_embedding_params"] += param.numel() * share[0] // share[1]
    return counts


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def run(ctx: StageContext) -> None:
    import os

    import numpy as np
    import torch

    from data_prep.shards import TokenShards
    from pipeline.models import build_model
    from pipeline.train import flops
    from pipeline.train.checkpoint import latest_checkpoint, save_checkpoint
    from pipeline.train.distributed import (
        TrainShape,
        build_accelerator,
        replica_digests,
        replicates_parameters,
    )
    from pipeline.train.optim import export_model, lr_factor, param_groups, replay_generator

    cfg: Config = ctx.config  # type: ignore[assignment]
    data_dir = ctx.upstream("tokenize").export_dir
    tokenizer_dir = ctx.upstream("tokenizer").export_dir
    meta = json.loads((data_dir / "meta.json").read_text())
    train, val = TokenShards(data_dir / "train"), TokenShards(data_dir / "val")

    launch = ctx.recipe.launch_for(ctx.name)
    precision = resolve_precision(cfg.precision)
    shape = TrainShape(
        cfg.micro_batch_size,
        cfg.grad_accum_steps,
        int(os.environ.get("WORLD_SIZE", "1")),
        precision,
        cfg.optim.grad_clip,
    )
    torch.manual_seed(ctx.seed)
    built = build_model(cfg.model, meta["vocab_size"], cfg.seq_len)
    model, objective = built.model, built.objective
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    param_counts = parameter_counts(model, cfg.model.experts_per_token, cfg.model.num_experts)
    num_params = param_counts["params"]
    flops_token = flops.flops_per_token(
        flops.matmul_params(
            model,
            cfg.model.experts_per_token,
            cfg.model.num_experts,
        ),
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.seq_len,
    )
    peak = cfg.peak_flops or flops.peak_flops(flops.device_name(), precision)

    accelerator = build_accelerator(launch, shape, list(model._no_split_modules or []), cfg.compile)
    world, rank = accelerator.num_processes, accelerator.process_index
    tokens_per_step = shape.global_batch * cfg.seq_len
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.schedule, cfg.max_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint)
    if found:
        path, ckpt = found
        if ckpt["global_batch"] != shape.global_batch:
            raise PipelineError(
                f"stages.{ctx.name}: checkpoint {path.name} used a global batch of {ckpt['global_batch']} "
                f"sequences, this launch gives {shape.global_batch}; keep nproc*micro_batch_size*"
                f"grad_accum_steps equal to resume, or rerun with --force"
            )
        accelerator.load_state(str(path))
        start_step = ckpt["step"]
        ctx.log.info("resuming from %s (step %d)", path.name, start_step)
    ctx.log.info(
        "%s (%s): %.2fM params, %s on %d ranks, %s, %d tokens/step, steps %d..%d",
        cfg.model.arch, objective.name, num_params / 1e6,
        launch.engine + (f" ZeRO-{launch.zero_stage}" if launch.engine == "deepspeed" else ""),
        world, precision, tokens_per_step, start_step, cfg.max_steps,
    )  # fmt: skip

    # Validation windows are split evenly so that sharded engines run the same collectives per rank.
    requested = cfg.eval_batches * cfg.micro_batch_size * world
    val_windows = np.stack(list(val.windows(cfg.seq_len, requested)))
    val_windows = val_windows[: len(val_windows) // world * world][rank::world]  # [N, T + 1]
    if len(val_windows) == 0:
        raise PipelineError(
            f"stages.{ctx.name}: the val split has fewer than {world} windows of seq_len+1"
        )

    def evaluate() -> float:
        """Mean objective loss over this rank's validation windows, averaged over ranks."""
        model.eval()
        total = torch.zeros(
            2, dtype=torch.float64, device=accelerator.device
        )  # [loss sum, batches]
        batches = torch.from_numpy(val_windows).to(accelerator.device).split(cfg.micro_batch_size)
        with torch.no_grad(), accelerator.autocast():
            for i, batch in enumerate(batches):
                loss, _ = objective.loss(model, batch, replay_generator(ctx.seed, "val", rank, i))
                total += torch.stack([loss.double() * len(batch), total.new_tensor(len(batch))])
        total = accelerator.reduce(total, reduction="sum")
        model.train()
        return (total[0] / total[1]).item()

    model.train()
    last_loss, val_loss = float("nan"), None
    window_start, window_steps = time.perf_counter(), 0
    with ctx.tracker(resume_step=start_step if found else None) as tracker:
        for step in ctx.progress(range(start_step, cfg.max_steps), desc="pretrain steps"):
            step_loss = torch.zeros((), device=accelerator.device)
            extras: dict[str, float] = {}
            for micro in range(cfg.grad_accum_steps):
                batch = train.batch(
                    ctx.seed,
                    step,
                    rank,
                    world,
                    cfg.micro_batch_size,
                    cfg.seq_len,
                    micro,
                    cfg.grad_accum_steps,
                )
                tokens = torch.from_numpy(batch).to(accelerator.device)  # [B, T + 1]
                # accumulate(): gradients sync (and DeepSpeed steps) on the last micro batch only;
                # backward() divides the loss by grad_accum_steps.
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, metrics = objective.loss(
                        model, tokens, replay_generator(ctx.seed, step, rank, micro)
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
            window_steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                last_loss = accelerator.reduce(step_loss, reduction="mean").item()
                per_device = (
                    window_steps * tokens_per_step / (time.perf_counter() - window_start) / world
                )
                row = {
                    "train/loss": last_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens_per_second": per_device * world,
                    "train/tokens_per_second_per_device": per_device,
                    "train/tokens": done * tokens_per_step,
                    **{f"train/{k}": v for k, v in extras.items()},
                }
                utilisation = flops.mfu(per_device, flops_token, peak)
                if utilisation is not None:
                    row["train/mfu"] = utilisation
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                tracker.log(row, step=done)
                ctx.log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f tok/s%s", done, cfg.max_steps, last_loss,
                    row["train/lr"], row["train/tokens_per_second"],
                    f" MFU {utilisation:.1%}" if utilisation is not None else "",
                )  # fmt: skip
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = evaluate()
                tracker.log({"val/loss": val_loss}, step=done)
                ctx.log.info("step %d val loss %.4f", done, val_loss)
            stopping = done < cfg.max_steps and preempt.requested(accelerator)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stopping:
                save_checkpoint(
                    accelerator, ctx.checkpoint_dir, done,
                    {"fingerprint": ctx.fingerprint, "global_batch": shape.global_batch, "world_size": world},
                    keep=cfg.keep_checkpoints,
                )  # fmt: skip
            if stopping:
                raise Preempted(
                    f"stages.{ctx.name}: preempted after step {done}; checkpoint saved, "
                    f"a rerun or requeue resumes from it"
                )
        summary = {
            "train_loss": last_loss,
            "val_loss": val_loss if val_loss is not None else evaluate(),
            "steps": cfg.max_steps,
            "tokens": cfg.max_steps * tokens_per_step,
            **param_counts,
            "flops_per_token": flops_token,
        }
        if replicates_parameters(launch):
            digests = replica_digests(accelerator, model)
            if len(set(digests)) != 1:
                raise RuntimeError(f"data-parallel replicas diverged: parameter digests {digests}")
            summary["replica_digests"] = digests
        tracker.summary(summary)
    export_model(accelerator, model, tokenizer_dir, ctx.export_dir, built.added_special_tokens)
    ctx.write_summary(summary, headline="val_loss")
