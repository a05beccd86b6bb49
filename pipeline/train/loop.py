"""The training loop: one short, linear Accelerate loop that pretrain, diffusion and vae drive.

A stage hands the loop a `Workload`: its model, a loss function and its data as pure functions
of (seed, step, rank, micro step). The loop owns everything else: the engine (DDP, FSDP,
DeepSpeed ZeRO, from the recipe's launch section through `pipeline.train.distributed`), the
optimizer and schedule, gradient accumulation and clipping, EMA, logging, validation,
checkpoints, preemption, resume and the check that data-parallel replicas agree. Every random
number of a loss comes from `replay_generator(seed, step, rank, micro)`, so resuming from a
checkpoint replays exactly what an uninterrupted run did and ends with the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.engine import preempt
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.train.config import LoopConfig
from pipeline.train.distributed import reshard
from pipeline.train.runtime import replay_generator, to_device

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from pipeline.engine.context import StageContext
    from pipeline.engine.tracking import Tracker
    from pipeline.train.ema import EMA

# A resumed run's probe loss may differ from the saved one by this much (relative) before it is
# reported; on the same code and engine it is bit-identical.
RESUME_TOLERANCE = 1e-5
# loss(model, batch on the device, generator) -> (loss to backpropagate, extra metrics to log)
LossFn = Callable[..., tuple["torch.Tensor", dict[str, Any]]]


@dataclass
class Workload:
    """What a stage hands the loop.

    `train_batch(step, micro, rank, world)` and `val_batches(rank, world)` return host arrays
    (or tuples of them), the first dimension being the batch; `item` names what a batch holds
    ("sequences", "images") and `tokens_per_item`, when set, turns throughput into tokens/s.
    """

    model: torch.nn.Module
    loss: LossFn
    train_batch: Callable[[int, int, int, int], Any]
    val_batches: Callable[[int, int], Sequence[Any]]
    item: str
    wrap_classes: list[str]
    tokens_per_item: int | None = None
    ema_decay: float | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None  # per device; default: the device's, at the run's precision
    describe: str = ""  # the head of the start line, e.g. "llama (causal_lm): 3.30M params"
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's own summary metrics


@dataclass
class Trained:
    """What the loop hands back: the prepared model, its EMA (or None) and summary metrics."""

    accelerator: Accelerator
    model: torch.nn.Module
    ema: EMA | None
    summary: dict[str, Any] = field(default_factory=dict)

    def ema_state_dict(self) -> dict[str, Any]:
        """The full state dict with the EMA weights, if any (gathered from shards; every rank
        calls this)."""
        accelerator, model, ema = self.accelerator, self.model, self.ema
        if ema is None:
            return accelerator.get_state_dict(model)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        try:
            # Copies: the state dict shares storage with the parameters restore() overwrites.
            return {k: v.detach().clone() for k, v in accelerator.get_state_dict(model).items()}
        finally:
            ema.restore(model.parameters())


def train(ctx: StageContext, cfg: LoopConfig, work: Workload) -> Trained:
    """Train work.model for cfg.max_steps, resuming from the newest checkpoint that fits."""
    loop = _Loop(ctx, cfg, work)
    with ctx.tracker(resume_step=loop.start_step or None) as tracker:
        for step in ctx.progress(range(loop.start_step, cfg.max_steps), desc=f"{ctx.kind} steps"):
            loop.step(step, tracker)
        summary = loop.summary()
        tracker.summary(summary)
    return Trained(loop.accelerator, loop.model, loop.ema, summary)


class _Loop:
    """The state of one training run between steps (engine, optimizer, EMA, log window)."""

    def __init__(self, ctx: StageContext, cfg: LoopConfig, work: Workload) -> None:
        from pipeline.train.distributed import (
            TrainShape,
            build_accelerator,
            fill_deepspeed_buckets,
            resolve_precision,
        )
        from pipeline.train.ema import EMA
        from pipeline.train.optim import build_optimizer, lambda_scheduler

        self.ctx, self.cfg, self.work = ctx, cfg, work
        self.launch = launch = ctx.recipe.launch_for(ctx.name)
        if work.ema_decay is not None and launch.engine == "deepspeed" and launch.zero_stage == 3:
            raise PipelineError(
                f"stages.{ctx.name}.launch: ZeRO-3 partitions the parameters the EMA averages; "
                f"use zero_stage 1 or 2, fsdp or ddp"
            )
        self.shape = shape = TrainShape(
            cfg.micro_batch_size, cfg.grad_accum_steps, ctx.world_size,
            resolve_precision(cfg.precision), cfg.optim.grad_clip,
        )  # fmt: skip
        accelerator = build_accelerator(launch, shape, work.wrap_classes, cfg.compile)
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        optimizer = build_optimizer(work.model, cfg.optim)
        self.scheduler = lambda_scheduler(optimizer, cfg.schedule, cfg.max_steps)
        fill_deepspeed_buckets(accelerator, work.model)
        self.model, self.optimizer = accelerator.prepare(work.model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.ema = None
        if work.ema_decay is not None:
            self.ema = EMA(accelerator.unwrap_model(self.model).parameters(), work.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
        self.resume_loss_diff: float | None = None
        self.start_step = self._resume()
        self.per_step = shape.global_batch * (work.tokens_per_item or 1)
        self.unit = unit = "tokens" if work.tokens_per_item else work.item
        engine = launch.engine + (
            f" ZeRO-{launch.zero_stage}" if launch.engine == "deepspeed" else ""
        )
        ctx.log.info(
            "%s, %s on %d ranks, %s, %d %s/step, steps %d..%d", work.describe, engine, self.world,
            shape.precision, self.per_step, unit, self.start_step, cfg.max_steps,
        )  # fmt: skip
        self.val = work.val_batches(self.rank, self.world)
        self.last_loss, self.val_loss, self.val_ema_loss = float("nan"), None, None
        self.bad_streak, self.skipped = 0, 0
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.model.train()

    def _resume(self) -> int:
        """Load the newest checkpoint of this configuration; the step to continue from (0: none)."""
        from pipeline.train.checkpoint import latest_checkpoint

        ctx, global_batch = self.ctx, self.shape.global_batch
        found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint)
        if not found:
            return 0
        path, meta = found
        if meta["global_batch"] != global_batch:
            raise PipelineError(
                f"stages.{ctx.name}: checkpoint {path.name} used a global batch of "
                f"{meta['global_batch']} {self.work.item}, this launch gives {global_batch}; keep "
                f"nproc*micro_batch_size*grad_accum_steps equal to resume, or rerun with --force"
            )
        self.accelerator.load_state(str(path))
        ctx.log.info("resuming from %s (step %d)", path.name, meta["step"])
        self._check_continuity(path.name, int(meta["step"]), meta.get("probe_loss"))
        return int(meta["step"])

    def _probe_loss(self, step: int) -> float:
        """The loss of the next step's first micro batch under the current weights (no update,
        fixed randomness), averaged over ranks: saved with a checkpoint, recomputed on resume."""
        raw = self.work.train_batch(step, 0, self.rank, self.world)
        with self._measuring():
            generator = replay_generator(self.ctx.seed, "probe", step, self.rank)
            loss, _ = self.work.loss(self.model, to_device(raw, self.accelerator.device), generator)
        return self.accelerator.reduce(loss.detach().double(), reduction="mean").item()

    def _check_continuity(self, name: str, step: int, saved: float | None) -> None:
        """Warn (log and summary) when the resumed state does not reproduce the saved probe loss:
        the checkpoint did not restore what the run had (a resume bug, other code or data)."""
        if saved is None:
            return
        now = self._probe_loss(step)
        self.resume_loss_diff = abs(now - saved)
        if not self.resume_loss_diff <= RESUME_TOLERANCE * max(1.0, abs(saved)):
            self.ctx.log.warning(
                "resume from %s: the probe loss is %.6f now, %.6f when saved; the resumed run "
                "does not continue the interrupted one exactly", name, now, saved,
            )  # fmt: skip

    def step(self, step: int, tracker: Tracker) -> None:
        """One optimizer step over grad_accum_steps micro batches, then log, eval, checkpoint."""
        import torch

        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        step_loss = torch.zeros((), device=accelerator.device)
        extras: dict[str, Any] = {}
        for micro in range(cfg.grad_accum_steps):
            raw = self.work.train_batch(step, micro, self.rank, self.world)
            batch = to_device(raw, accelerator.device)
            # accumulate(): gradients sync (and DeepSpeed steps) on the last micro batch only;
            # backward() divides the loss by grad_accum_steps.
            with accelerator.accumulate(model), accelerator.autocast():
                generator = replay_generator(self.ctx.seed, step, self.rank, micro)
                loss, metrics = self.work.loss(model, batch, generator)
                accelerator.backward(loss)
            # Metrics stay tensors (no host sync) until a log step reads them.
            step_loss += loss.detach() / cfg.grad_accum_steps
            for key, value in metrics.items():
                extras[key] = extras.get(key, 0.0) + value / cfg.grad_accum_steps
        clip = cfg.optim.grad_clip
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
        done = step + 1
        bad, preempted = self._signals(step_loss, grad_norm)
        if bad:
            self._skip(tracker, done)
        else:
            self.bad_streak = 0
            self.optimizer.step()
        self.scheduler.step()  # the learning rate stays a function of the step, skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and not bad:
            self.ema.step(model.parameters())
        self.window_steps += 1
        final = done == cfg.max_steps
        if done % cfg.log_every == 0 or final:
            self._log(tracker, done, step_loss, extras, grad_norm)
        if done % cfg.eval_every == 0 or final:
            self._validate(tracker, done)
        stopping = not final and preempted
        if done % cfg.checkpoint_every == 0 or final or stopping:
            from pipeline.train.checkpoint import save_checkpoint

            meta = {"fingerprint": self.ctx.fingerprint, "global_batch": self.shape.global_batch,
                    "world_size": self.world, "probe_loss": self._probe_loss(done)}  # fmt: skip
            save_checkpoint(accelerator, self.ctx.checkpoint_dir, done, meta, cfg.keep_checkpoints)
        if stopping:
            raise Preempted(
                f"stages.{self.ctx.name}: preempted after step {done}; checkpoint saved, "
                f"a rerun or requeue resumes from it"
            )

    def _signals(self, step_loss: Any, grad_norm: Any) -> tuple[bool, bool]:
        """(a non-finite loss or grad norm on any rank, preemption asked on any rank), agreed by
        every rank in one collective, so all ranks skip, stop or checkpoint the same step."""
        import torch

        if not self.cfg.max_bad_steps:
            return False, preempt.requested(self.accelerator)
        finite = torch.isfinite(step_loss)
        if grad_norm is not None:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=finite.device))
        flags = torch.stack([(~finite).float(), step_loss.new_tensor(float(preempt.received()))])
        if self.world > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad, preempted = flags.tolist()
        return bad > 0, preempted > 0

    def _skip(self, tracker: Tracker, done: int) -> None:
        """Leave out the update of a non-finite step; stop after max_bad_steps in a row."""
        from pipeline.train.checkpoint import latest_checkpoint

        self.bad_streak += 1
        self.skipped += 1
        tracker.log({"train/skipped_step": 1.0, "train/skipped_steps": self.skipped}, step=done)
        self.ctx.log.warning("step %d: non-finite loss or gradient norm; update skipped", done)
        deepspeed = self.launch.engine == "deepspeed"  # DeepSpeed stepped inside backward()
        if self.bad_streak >= self.cfg.max_bad_steps or deepspeed:
            found = latest_checkpoint(self.ctx.checkpoint_dir, self.ctx.fingerprint)
            last = found[0].name if found else "none (the stage starts over)"
            raise PipelineError(
                f"stages.{self.ctx.name}: {self.bad_streak} optimizer step(s) in a row up to step "
                f"{done} had a non-finite loss or gradient norm; last good checkpoint: {last}; "
                f"lower optim.lr, lengthen schedule.warmup_steps or check the data of those "
                f"steps, then rerun (it resumes from that checkpoint)"
            )

    def _log(
        self, tracker: Tracker, done: int, step_loss: Any, extras: dict[str, Any], grad_norm: Any
    ) -> None:
        from pipeline.train import flops

        work = self.work
        self.last_loss = self.accelerator.reduce(step_loss, reduction="mean").item()
        rate = self.window_steps * self.per_step / (time.perf_counter() - self.window_start)
        unit = self.unit
        row: dict[str, Any] = {
            "train/loss": self.last_loss,
            "train/lr": self.scheduler.get_last_lr()[0],
        }
        row[f"train/{unit}_per_second"] = rate
        if work.tokens_per_item:
            row["train/tokens_per_second_per_device"] = rate / self.world
        row[f"train/{unit}"] = done * self.per_step
        row.update({f"train/{k}": float(v) for k, v in extras.items()})
        utilisation = None
        if work.flops_per_token is not None:
            peak = work.peak_flops or flops.peak_flops(flops.device_name(), self.shape.precision)
            utilisation = flops.mfu(rate / self.world, work.flops_per_token, peak)
        if utilisation is not None:
            row["train/mfu"] = utilisation
        if grad_norm is not None:
            row["train/grad_norm"] = float(grad_norm)
        tracker.log(row, step=done)
        self.ctx.log.info(
            "step %d/%d loss %.4f lr %.2e %.0f %s/s%s", done, self.cfg.max_steps, self.last_loss,
            row["train/lr"], rate, unit, f" MFU {utilisation:.1%}" if utilisation is not None else "",
        )  # fmt: skip
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _validate(self, tracker: Tracker, done: int) -> None:
        self.val_loss, self.val_ema_loss = self.evaluate(), self.evaluate_ema()
        row = {"val/loss": self.val_loss}
        if self.val_ema_loss is not None:
            row["val/ema_loss"] = self.val_ema_loss
        tracker.log(row, step=done)
        ema_note = f" (EMA {self.val_ema_loss:.4f})" if self.val_ema_loss is not None else ""
        self.ctx.log.info("step %d val loss %.4f%s", done, self.val_loss, ema_note)

    def evaluate(self) -> float:
        """Mean loss over this rank's validation batches (fixed randomness), averaged over ranks."""
        import torch

        accelerator = self.accelerator
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum, count]
        with self._measuring():
            for i, raw in enumerate(self.val):
                batch = to_device(raw, accelerator.device)
                generator = replay_generator(self.ctx.seed, "val", self.rank, i)
                loss, _ = self.work.loss(self.model, batch, generator)
                size = len(raw[0]) if isinstance(raw, tuple) else len(raw)
                total += torch.stack([loss.double() * size, total.new_tensor(size)])
        total = accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()

    @contextmanager
    def _measuring(self) -> Iterator[None]:
        """Forward passes that measure, not train: eval mode, no grad, the training autocast;
        then back to training, FSDP2 parameters sharded again."""
        import torch

        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            reshard(self.model)
            self.model.train()

    def evaluate_ema(self) -> float | None:
        """The validation loss of the EMA weights (swapped in, then the live ones restored)."""
        if self.ema is None:
            return None
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            return self.evaluate()
        finally:
            self.ema.restore(self.model.parameters())

    def summary(self) -> dict[str, Any]:
        """Final train/val losses, steps and what was seen, the stage's metrics, replica digests."""
        from pipeline.train.distributed import replica_digests, replicates_parameters

        if self.val_loss is None:  # resumed at the last step: nothing was validated this run
            self.val_loss, self.val_ema_loss = self.evaluate(), self.evaluate_ema()
        seen = "tokens" if self.work.tokens_per_item else f"{self.work.item}_seen"
        summary = {
            "train_loss": self.last_loss,
            "val_loss": self.val_loss,
            "steps": self.cfg.max_steps,
            seen: self.cfg.max_steps * self.per_step,
            "skipped_steps": self.skipped,
            **self.work.summary,
        }
        if self.val_ema_loss is not None:
            summary["val_ema_loss"] = self.val_ema_loss
        if self.resume_loss_diff is not None:
            summary["resume_loss_diff"] = self.resume_loss_diff
        if replicates_parameters(self.launch):
            digests = replica_digests(self.accelerator, self.model)
            if len(set(digests)) != 1:
                raise RuntimeError(f"data-parallel replicas diverged: parameter digests {digests}")
            summary["replica_digests"] = digests
        return summary
