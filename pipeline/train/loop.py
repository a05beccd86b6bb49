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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine import faults, preempt
from pipeline.engine.errors import PipelineError, Preempted
from pipeline.train.config import LoopConfig
from pipeline.train.measure import Measure
from pipeline.train.runtime import replay_generator, to_device
from pipeline.train.stability import NonFiniteGuard, SpikeGuard
from pipeline.train.workload import Trained, Workload

if TYPE_CHECKING:
    from pipeline.engine.context import StageContext
    from pipeline.engine.tracking import Tracker

__all__ = ["Trained", "Workload", "train"]

# A resumed run's probe loss may differ from the saved one by this much (relative) before it is
# reported; on the same code and engine it is bit-identical.
RESUME_TOLERANCE = 1e-5


def train(ctx: StageContext, cfg: LoopConfig, work: Workload) -> Trained:
    """Train work.model for cfg.max_steps, resuming from the newest checkpoint that fits."""
    loop = _Loop(ctx, cfg, work)

    def steps() -> Iterator[int]:
        step = loop.start_step
        while step < cfg.max_steps:
            yield step
            step = loop.next_step  # step + 1, or back to a checkpoint after a rollback

    with ctx.tracker(resume_step=loop.start_step or None) as tracker:
        total = cfg.max_steps - loop.start_step
        for step in ctx.progress(steps(), total=total, desc=f"{ctx.kind} steps"):
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
        model = work.model if work.load_weights is None else work.load_weights(accelerator)
        optimizer = build_optimizer(model, cfg.optim)
        self.anneal = _anneal_checkpoint(ctx.name, work)
        start = int(self.anneal[1]["step"]) if self.anneal else None
        self.scheduler = lambda_scheduler(optimizer, cfg.schedule, cfg.max_steps, start)
        fill_deepspeed_buckets(accelerator, model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)  # keeps a loaded layout
        accelerator.register_for_checkpointing(self.scheduler)
        self.ema = None
        if work.ema_decay is not None:
            self.ema = EMA(accelerator.unwrap_model(self.model).parameters(), work.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
        self.spikes = SpikeGuard(cfg.spike) if cfg.spike.rollback else None
        if self.spikes is not None:
            self.scheduler.lr_lambdas = [self.spikes.scaled(f) for f in self.scheduler.lr_lambdas]
        self.measure = Measure(self.model, accelerator, work, ctx.seed, self.rank, self.world,
                               self.ema, work.val_batches(self.rank, self.world))  # fmt: skip
        self.resume_loss_diff: float | None = None
        self.start_step = self._resume()
        self.next_step, self.logged_upto = self.start_step, self.start_step
        self.per_step = shape.global_batch * (work.tokens_per_item or 1)
        self.unit = unit = "tokens" if work.tokens_per_item else work.item
        engine = launch.engine + (
            f" ZeRO-{launch.zero_stage}" if launch.engine == "deepspeed" else ""
        )
        ctx.log.info(
            "%s, %s on %d ranks, %s, %d %s/step, steps %d..%d", work.describe, engine, self.world,
            shape.precision, self.per_step, unit, self.start_step, cfg.max_steps,
        )  # fmt: skip
        self.last_loss, self.val_loss, self.val_ema_loss = float("nan"), None, None
        self.evaluations: dict[str, float] = {}
        self.nonfinite = NonFiniteGuard(cfg.max_bad_steps)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.model.train()

    def _resume(self) -> int:
        """Load the newest checkpoint of this configuration; the step to continue from (0: none)."""
        from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint

        ctx, global_batch = self.ctx, self.shape.global_batch
        found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint) or self.anneal
        if not found:
            return 0
        path, meta = found
        if meta["global_batch"] != global_batch:
            raise PipelineError(
                f"stages.{ctx.name}: checkpoint {path.name} used a global batch of "
                f"{meta['global_batch']} {self.work.item}, this launch gives {global_batch}; keep "
                f"nproc*micro_batch_size*grad_accum_steps equal to resume, or rerun with --force"
            )
        load_checkpoint(self.accelerator, path, meta, ctx.name)  # resharded if other ranks wrote it
        if self.spikes is not None:
            self.spikes.load(meta.get("spike"))
        where = path.name if path.parent == ctx.checkpoint_dir else path  # annealing: another's
        saved_world = int(meta.get("world_size", self.world))
        ctx.log.info("resuming from %s (step %d, %d ranks)", where, meta["step"], saved_world)
        if saved_world == self.world:  # the probe's batch and randomness are per rank
            self._check_continuity(path.name, int(meta["step"]), meta.get("probe_loss"))
        return int(meta["step"])

    def _check_continuity(self, name: str, step: int, saved: float | None) -> None:
        """Warn (log and summary) when the resumed state does not reproduce the saved probe loss:
        the checkpoint did not restore what the run had (a resume bug, other code or data)."""
        if saved is None:
            return
        now = self.measure.probe_loss(step)
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
        self.next_step = done = step + 1
        if self.spikes is not None and step in self.spikes.skip:
            self._leave_out(tracker, done)  # a batch a rollback left out: no forward, no update
            return
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
        faults.point(self.ctx.name, "mid_step")
        clip = cfg.optim.grad_clip
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
        bad, preempted, mean_loss = self._signals(step_loss, grad_norm)
        if not bad and self.spikes is not None and self.spikes.is_spike(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            self._rollback(step, mean_loss, tracker)
            return
        if bad:
            self._skip(tracker, done)
        else:
            self.nonfinite.streak = 0
            self.optimizer.step()
            if self.spikes is not None:
                self.spikes.record(mean_loss)
        self.scheduler.step()  # the learning rate stays a function of the step, skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and not bad:
            self.ema.step(model.parameters())
        self.window_steps += 1
        final = done == cfg.max_steps
        if (done % cfg.log_every == 0 or final) and done > self.logged_upto:
            self._log(tracker, done, step_loss, extras, grad_norm)
        self._cadence(tracker, done, preempted)

    def _cadence(self, tracker: Tracker, done: int, preempted: bool) -> None:
        """Validate, checkpoint and stop for preemption when `done` steps call for it."""
        cfg = self.cfg
        final = done == cfg.max_steps
        if (done % cfg.eval_every == 0 or final) and done > self.logged_upto:
            self._validate(tracker, done)
        stopping = not final and preempted
        if done % cfg.checkpoint_every == 0 or final or stopping:
            from pipeline.train.checkpoint import save_checkpoint

            meta = {"fingerprint": self.ctx.fingerprint, "global_batch": self.shape.global_batch,
                    "world_size": self.world, "probe_loss": self.measure.probe_loss(done)}  # fmt: skip
            if self.spikes is not None:
                meta["spike"] = self.spikes.state()
            started = time.perf_counter()  # the last (or preemption) save waits for every write
            save_checkpoint(
                self.accelerator, self.ctx.checkpoint_dir, done, meta, cfg.keep_checkpoints,
                config=self.ctx.config.model_dump(mode="json"),
                asynchronous=cfg.checkpoint_async and not (final or stopping),
            )  # fmt: skip
            tracker.log({"train/checkpoint_blocked_s": time.perf_counter() - started}, step=done)
        if stopping:
            raise Preempted(
                f"stages.{self.ctx.name}: preempted after step {done}; checkpoint saved, "
                f"a rerun or requeue resumes from it"
            )

    def _leave_out(self, tracker: Tracker, done: int) -> None:
        """A step whose batch a rollback skipped: the schedule advances, nothing is trained."""
        import torch

        _, preempted, _ = self._signals(torch.zeros((), device=self.accelerator.device), None)
        self.scheduler.step()
        self._cadence(tracker, done, preempted)

    def _rollback(self, step: int, loss: float, tracker: Tracker) -> None:
        """A loss spike at `step`: reload the newest checkpoint before the batches to skip and
        replay from it without them (or, with no such checkpoint, leave this step out)."""
        from pipeline.train.checkpoint import (
            latest_checkpoint,
            load_checkpoint,
            wait_for_checkpoint,
        )

        spikes, ctx, done = self.spikes, self.ctx, step + 1
        assert spikes is not None
        wait_for_checkpoint()  # a pending asynchronous save may be the one to go back to
        skipped = spikes.plan(step, loss, ctx.name)
        found = latest_checkpoint(ctx.checkpoint_dir, ctx.fingerprint, max_step=skipped.start)
        event, message = spikes.rolled_back(step, loss, skipped, found)
        ctx.log.warning(message)
        tracker.log(event, step=done)
        self.logged_upto = max(self.logged_upto, done)
        if found is None:
            self._leave_out(tracker, done)
            return
        load_checkpoint(self.accelerator, found[0], found[1], ctx.name)
        spikes.load(found[1].get("spike"), history_only=True)
        spikes.rescale(self.scheduler)
        self.nonfinite.streak, self.next_step = 0, int(found[1]["step"])

    def _signals(self, step_loss: Any, grad_norm: Any) -> tuple[bool, bool, float]:
        """(a non-finite loss or grad norm on any rank, preemption asked on any rank, the loss
        averaged over ranks (nan without the spike guard)), agreed by every rank in one
        collective, so all ranks skip, roll back, stop or checkpoint the same step."""
        import torch

        spikes = self.spikes is not None
        if not self.cfg.max_bad_steps and not spikes:
            return False, preempt.requested(self.accelerator), float("nan")
        finite = torch.isfinite(step_loss)
        if grad_norm is not None:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=finite.device))
        parts = [(~finite).float(), step_loss.new_tensor(float(preempt.received()))]
        flags = torch.stack(parts + [step_loss.detach().float()] if spikes else parts)
        if self.world > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        values = flags.tolist()
        mean_loss = values[2] / self.world if spikes else float("nan")
        return bool(self.cfg.max_bad_steps) and values[0] > 0, values[1] > 0, mean_loss

    def _skip(self, tracker: Tracker, done: int) -> None:
        """Leave out the update of a non-finite step; stop after max_bad_steps in a row."""
        from pipeline.train.checkpoint import latest_checkpoint, wait_for_checkpoint

        tracker.log(self.nonfinite.skipped(), step=done)
        self.ctx.log.warning("step %d: non-finite loss or gradient norm; update skipped", done)
        deepspeed = self.launch.engine == "deepspeed"  # DeepSpeed stepped inside backward()
        if self.nonfinite.exhausted() or deepspeed:
            wait_for_checkpoint()  # so that the error names a pending save once it is complete
            found = latest_checkpoint(self.ctx.checkpoint_dir, self.ctx.fingerprint)
            raise self.nonfinite.stop(self.ctx.name, done, found[0].name if found else None)

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

    def _validate(self, tracker: Tracker | None, done: int) -> None:
        """Validation loss (and its EMA twin) and the stage's evaluators; logged unless the
        tracker is None (a resumed run's summary of a step already logged)."""
        measure = self.measure
        self.val_loss, self.val_ema_loss = measure.val_loss(), measure.ema_val_loss()
        self.evaluations = measure.evaluations()
        row = {"val/loss": self.val_loss, **{f"val/{k}": v for k, v in self.evaluations.items()}}
        if self.val_ema_loss is not None:
            row["val/ema_loss"] = self.val_ema_loss
        if tracker is not None:
            tracker.log(row, step=done)
        ema_note = f" (EMA {self.val_ema_loss:.4f})" if self.val_ema_loss is not None else ""
        extra = "".join(f", {k} {v:.4g}" for k, v in self.evaluations.items())
        self.ctx.log.info("step %d val loss %.4f%s%s", done, self.val_loss, ema_note, extra)

    def summary(self) -> dict[str, Any]:
        """Final train/val losses, steps and what was seen, the stage's metrics, replica digests."""
        from pipeline.train.distributed import replica_digests, replicates_parameters

        if self.val_loss is None:  # resumed at the last step: nothing was validated this run
            self._validate(None, self.cfg.max_steps)
        seen = "tokens" if self.work.tokens_per_item else f"{self.work.item}_seen"
        summary = {
            "train_loss": self.last_loss,
            "val_loss": self.val_loss,
            "steps": self.cfg.max_steps,
            seen: self.cfg.max_steps * self.per_step,
            "skipped_steps": self.nonfinite.count,
            **(self.spikes.summary() if self.spikes is not None else {}),
            **self.evaluations,
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


def _anneal_checkpoint(stage: str, work: Workload) -> tuple[Path, dict[str, Any]] | None:
    """The verified checkpoint `work.anneal_from` names, with its meta (None: not annealing)."""
    from pipeline.train.checkpoint import verify_checkpoint

    if work.anneal_from is None:
        return None
    meta = verify_checkpoint(work.anneal_from)
    if meta is None:
        raise PipelineError(
            f"stages.{stage}.anneal_from: {work.anneal_from} is not a complete, verified "
            f"checkpoint; name a step whose checkpoint exists (keep_checkpoints keeps the newest)"
        )
    return work.anneal_from, meta
