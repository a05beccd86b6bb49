"""Pretraining of a decoder-only LM on token shards: a short, linear loop on Accelerate.

Batches are a pure function of (seed, step, rank), so resuming from a checkpoint replays exactly
the data an uninterrupted run would have seen; the optimizer, schedule and RNG states come back
from the checkpoint, so the resumed run ends with the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import StageConfig, Strict
from pipeline.context import StageContext
from pipeline.errors import PipelineError
from pipeline.models.causal_lm import ModelConfig


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(Strict):
    kind: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class Config(StageConfig):
    kind: Literal["pretrain"]
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(256, ge=8)
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Literal["fp32", "bf16"] = "fp32"
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


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, max_steps - schedule.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or other vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def causal_lm_loss(model, tokens):
    """Mean next-token cross-entropy of `tokens` [batch, seq_len + 1]."""
    import torch.nn.functional as F

    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T], [B, T]
    logits = model(input_ids=inputs).logits  # [B, T, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def run(ctx: StageContext) -> None:
    import numpy as np
    import torch

    from data_prep.shards import TokenShards
    from pipeline.checkpoint import latest_checkpoint, save_checkpoint
    from pipeline.distributed import build_accelerator, replica_digests
    from pipeline.models.causal_lm import build_causal_lm

    cfg: Config = ctx.config  # type: ignore[assignment]
    data_dir = ctx.upstream("tokenize").export_dir
    tokenizer_dir = ctx.upstream("tokenizer").export_dir
    meta = json.loads((data_dir / "meta.json").read_text())
    train, val = TokenShards(data_dir / "train"), TokenShards(data_dir / "val")

    accelerator = build_accelerator(ctx.recipe.launch_for(ctx.name), cfg.precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * world
    tokens_per_step = global_batch * cfg.seq_len

    torch.manual_seed(ctx.seed)
    model = build_causal_lm(
        cfg.model, meta["vocab_size"], cfg.seq_len, bos_id=1, eos_id=meta["eos_id"], pad_id=3
    )
    num_params = sum(p.numel() for p in model.parameters())
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.schedule, cfg.max_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint)
    if found:
        path, ckpt = found
        if ckpt["global_batch"] != global_batch:
            raise PipelineError(
                f"stages.{ctx.name}: checkpoint {path.name} used a global batch of {ckpt['global_batch']} "
                f"sequences, this launch gives {global_batch}; keep nproc*micro_batch_size*grad_accum_steps "
                f"equal to resume, or rerun with --force"
            )
        accelerator.load_state(str(path))
        start_step = ckpt["step"]
        ctx.log.info("resuming from %s (step %d)", path.name, start_step)
    ctx.log.info(
        "%s: %.2fM params, %d ranks, %d tokens/step, steps %d..%d",
        cfg.model.arch,
        num_params / 1e6,
        world,
        tokens_per_step,
        start_step,
        cfg.max_steps,
    )

    def evaluate() -> float:
        """Mean validation loss over the first eval_batches*world micro batches, split over ranks."""
        model.eval()
        count = cfg.eval_batches * cfg.micro_batch_size * world
        windows = np.stack(list(val.windows(cfg.seq_len, count)))[rank::world]  # [N, T + 1]
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [nll, tokens]
        with torch.no_grad(), accelerator.autocast():
            for batch in (
                torch.from_numpy(windows).to(accelerator.device).split(cfg.micro_batch_size)
            ):
                targets = batch[:, 1:].numel()
                total[0] += causal_lm_loss(model, batch).double() * targets
                total[1] += targets
        total = accelerator.reduce(total, reduction="sum")
        model.train()
        return (total[0] / total[1]).item()

    def checkpoint(step: int) -> None:
        save_checkpoint(
            accelerator,
            ctx.checkpoint_dir,
            step,
            {"fingerprint": ctx.fingerprint, "global_batch": global_batch, "world_size": world},
            keep=cfg.keep_checkpoints,
        )

    model.train()
    last_loss = float("nan")
    val_loss = None
    window_start, window_steps = time.perf_counter(), 0
    with ctx.tracker(resume_step=start_step if found else None) as tracker:
        for step in ctx.progress(range(start_step, cfg.max_steps), desc="pretrain steps"):
            step_loss = torch.zeros((), device=accelerator.device)
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
                tokens = torch.from_numpy(batch).to(accelerator.device)
                # Gradients are all-reduced only on the last micro batch of the step.
                sync = (
                    nullcontext()
                    if micro == cfg.grad_accum_steps - 1
                    else accelerator.no_sync(model)
                )
                with sync, accelerator.autocast():
                    loss = causal_lm_loss(model, tokens) / cfg.grad_accum_steps
                    accelerator.backward(loss)
                step_loss += loss.detach()
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
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": last_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens_per_second": window_steps * tokens_per_step / elapsed,
                    "train/tokens": done * tokens_per_step,
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                tracker.log(metrics, step=done)
                ctx.log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f tok/s",
                    done,
                    cfg.max_steps,
                    last_loss,
                    metrics["train/lr"],
                    metrics["train/tokens_per_second"],
                )
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = evaluate()
                tracker.log({"val/loss": val_loss}, step=done)
                ctx.log.info("step %d val loss %.4f", done, val_loss)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                checkpoint(done)
        digests = replica_digests(accelerator, model)
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged: parameter digests {digests}")
        summary = {
            "train_loss": last_loss,
            "val_loss": val_loss if val_loss is not None else evaluate(),
            "steps": cfg.max_steps,
            "tokens": cfg.max_steps * tokens_per_step,
            "params": num_params,
            "replica_digests": digests,
        }
        tracker.summary(summary)
    export(ctx, accelerator, model, tokenizer_dir)
    ctx.write_summary(summary, headline="val_loss")


def export(ctx: StageContext, accelerator, model, tokenizer_dir) -> None:
    """Save model + tokenizer as a Hugging Face directory (safetensors), written by rank 0."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from transformers import AutoTokenizer

        tmp = ctx.stage_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.generation_config.pad_token_id = unwrapped.config.pad_token_id
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        shutil.rmtree(ctx.export_dir, ignore_errors=True)
        tmp.rename(ctx.export_dir)
    accelerator.wait_for_everyone()
