"""A guard against reward hacking in RL: gold measured as the policy trains, early stop, best export.

A learned reward is a proxy: Gao, Schulman and Hilton (2022) measured the gold reward of policies
optimised against one and found it rising, then falling, as the policy moves away from where it
started (d = sqrt(KL(policy || start))), while the proxy keeps rising. The guard measures the
gold metric (the task's verifiable reward, greedy, on problems the RL stage never trains on) and
KL(policy || start) every `every` steps, stops when gold has not beaten its best for `patience`
measurements, and restores the best policy before the export, so the stage never exports a
policy the proxy has talked into being worse than one it had.

Gold problems are drawn from the task's train split after the RL prompts (disjoint from them and
from the test split), so choosing a checkpoint by them does not bias the held-out accuracy that
the stage and the eval stage report. KL is estimated on sampled completions (temperature 1, full
distribution): E_{y ~ policy}[log policy(y|x) - log start(y|x)], in nats per completion.

State (the measurements, and the best policy's trainable weights) lives in the stage's `guard/`
folder; a resumed run drops the measurements after the step it resumes from and replays them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.config import Strict
from pipeline.engine.manifest import atomic_write_json
from pipeline.stages.kl_control import KLControl
from pipeline.stages.rl_gold import gold_accuracy, gold_problems, sequence_kl

if TYPE_CHECKING:
    from pipeline.engine.context import StageContext

GUARD_DIR = "guard"
STATE_FILE = "state.json"
KL_FILE = "kl_control.json"


class GuardConfig(Strict):
    """When to measure gold and KL, and when to stop."""

    every: int = Field(10, ge=1, description="optimizer steps between measurements (and step 0)")
    problems: int = Field(
        200, ge=1, description="gold problems scored greedily per measurement (never trained on)"
    )
    patience: int = Field(
        3, ge=1, description="stop after this many measurements without a new best gold"
    )
    min_delta: float = Field(0.0, ge=0, description="gold must beat its best by more than this")
    kl_prompts: int = Field(
        32, ge=0, description="prompts sampled to estimate KL(policy || start); 0: off"
    )


@dataclass(frozen=True)
class Measurement:
    step: int
    gold: float
    kl: float | None = None  # nats per completion, KL(policy || start)
    proxy: float | None = None  # the trainer's last logged mean reward

    def metrics(self) -> dict[str, float]:
        """What the tracker gets: gold, KL and its square root (Gao et al.'s d), the proxy."""
        shown = {"guard/gold": self.gold}
        if self.kl is not None:
            shown |= {"guard/kl": self.kl, "guard/sqrt_kl": max(self.kl, 0.0) ** 0.5}
        if self.proxy is not None:
            shown["guard/proxy"] = self.proxy
        return shown


class Guard:
    """The measurements of one run and the decisions taken from them (rank-independent: every
    rank measures the same problems and decides the same)."""

    def __init__(self, cfg: GuardConfig, directory: Path) -> None:
        self.cfg, self.directory = cfg, directory
        self.history: list[Measurement] = []
        self.stopped_at: int | None = None
        path = directory / STATE_FILE
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.history = [Measurement(**row) for row in data["history"]]

    @property
    def best(self) -> Measurement | None:
        """The first measurement whose gold no later one beat by more than min_delta."""
        return self.best_until(None)

    def resume_at(self, step: int) -> None:
        """Forget the measurements after `step` (a resumed run makes them again); a run that
        starts from step 0 keeps none (they were another run's)."""
        self.history = [m for m in self.history if step > 0 and m.step <= step]
        self.stopped_at = None

    def record(self, measurement: Measurement) -> bool:
        """Add a measurement; True when it is the new best."""
        self.history.append(measurement)
        return self.best is measurement

    def should_stop(self) -> bool:
        """Gold has not beaten its best for `patience` measurements."""
        best = self.best
        return best is not None and sum(m.step > best.step for m in self.history) >= (
            self.cfg.patience
        )

    def keep(self, measurement: Measurement, model: Any, keep_steps: set[int] | None) -> None:
        """Record a measurement; on rank 0 (`keep_steps`: the checkpoints on disk) also save
        the policy's weights when it is the new best, and the state."""
        from safetensors.torch import save_file

        improved = self.record(measurement)
        if keep_steps is None:
            return
        if improved:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(model), str(self.weights_path(measurement.step)))
        self.save(keep_steps)

    def weights_path(self, step: int) -> Path:
        return self.directory / f"best-{step}.safetensors"

    def save(self, keep_steps: set[int]) -> None:
        """Write the measurements; remove best-weight files no longer needed (those of the best
        and of the best of each prefix a kept checkpoint may resume from stay)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.directory / STATE_FILE, {"history": [asdict(m) for m in self.history]}
        )
        needed = {m.step for m in map(self.best_until, [*keep_steps, None]) if m is not None}
        for path in self.directory.glob("best-*.safetensors"):
            if int(path.stem.removeprefix("best-")) not in needed:
                path.unlink()

    def best_until(self, step: int | None) -> Measurement | None:
        """The best measurement at or before `step` (of all of them: None)."""
        best: Measurement | None = None
        for m in self.history:
            if (step is None or m.step <= step) and (
                best is None or m.gold > best.gold + self.cfg.min_delta
            ):
                best = m
        return best

    def summary(self) -> dict[str, Any]:
        """What the stage summary says of the guard: the exported step and why."""
        best, last = self.best, self.history[-1] if self.history else None
        if best is None or last is None:
            return {}
        reason = (
            f"gold did not beat {best.gold:.3f} (step {best.step}) for {self.cfg.patience} "
            f"measurements: stopped at step {self.stopped_at}"
            if self.stopped_at is not None
            else f"ran to the last step; best gold {best.gold:.3f} at step {best.step}"
        )
        out = {
            "guard_best_step": best.step,
            "guard_best_gold": best.gold,
            "guard_last_step": last.step,
            "guard_last_gold": last.gold,
            "guard_reason": reason,
        }
        if best.kl is not None:
            out["guard_best_kl"] = best.kl
        return out


def trainable_state(model: Any) -> dict[str, Any]:
    """The parameters training changes (every weight, or an adapter's), detached on the CPU."""
    return {
        name: p.detach().to("cpu").clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def restore(model: Any, path: Path) -> None:
    """Load trainable weights saved by `trainable_state` back into `model`."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def guard_callback(
    guard: Guard | None,
    measure: Callable[[Any, int], Measurement] | None,
    kl_control: KLControl | None,
    log: Callable[[dict[str, float], int], None],
    keep_steps: Callable[[], set[int]],
    is_main: bool,
) -> Any:
    """A TrainerCallback that runs the guard (measure every `every` steps, keep the best
    policy's weights, stop on patience) and the adaptive KL coefficient. `measure(model, step)`
    returns the gold and KL of the policy; `log(metrics, step)` sends them to the tracker;
    `keep_steps()` are the steps of the checkpoints on disk. `trainer` is set once built."""
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        trainer: Any = None

        def __init__(self) -> None:
            self.proxy: float | None = None
            self.last_log_step = 0

        def summary(self) -> dict[str, Any]:
            return guard.summary() if guard is not None else {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            if kl_control is not None:
                self.trainer.beta = kl_control.resume_at(step)
                self.last_log_step = step
            if guard is None:
                return
            guard.resume_at(step)
            measured = {m.step for m in guard.history}
            if step % guard.cfg.every == 0 and step not in measured:
                self._measure(kwargs["model"], step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = logs or {}
            if "reward" in logs:
                self.proxy = float(logs["reward"])
            if kl_control is not None and "kl" in logs:
                step = state.global_step
                beta = kl_control.update(step, step - self.last_log_step, float(logs["kl"]),
                                         self.trainer.beta)  # fmt: skip
                self.trainer.beta, self.last_log_step = beta, step
                if is_main:
                    kl_control.save()
                log({"train/beta": beta}, step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            if (
                guard is not None
                and step % guard.cfg.every == 0
                and self._measure(kwargs["model"], step)
            ):
                guard.stopped_at = step
                control.should_training_stop = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Measure the last policy too, then put the best one in place for the export."""
            model, step = kwargs["model"], state.global_step
            if guard is None or (step < state.max_steps and guard.stopped_at is None):
                return  # preempted: the resumed run measures and decides as if uninterrupted
            if step not in {m.step for m in guard.history}:
                self._measure(model, step)
            best = guard.best
            self.trainer.accelerator.wait_for_everyone()  # rank 0 has written its weights
            if best is not None and best.step != step:
                restore(model, guard.weights_path(best.step))

        def _measure(self, model: Any, step: int) -> bool:
            assert guard is not None and measure is not None
            m = measure(model, step)
            m = Measurement(m.step, m.gold, m.kl, self.proxy)
            guard.keep(m, model, keep_steps() if is_main else None)
            log(m.metrics(), step)
            return guard.should_stop()

    return GuardCallback()


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[Any]:
    """The start policy of an adapter run: its base, with the adapter disabled."""
    with model.disable_adapter():
        yield model


def guard_for(
    ctx: StageContext,
    cfg: Any,
    tokenizer: Any,
    start: Path,
    log: Callable[[dict[str, float], int], None],
) -> Any | None:
    """The GuardCallback of an rlhf stage (its `guard` and `target_kl`), or None without either.
    `start` is the directory of the starting policy (the KL reference when no adapter is on);
    `log(metrics, step)` sends to the stage's tracker."""
    if cfg.guard is None and getattr(cfg, "target_kl", None) is None:
        return None
    guard = Guard(cfg.guard, ctx.stage_dir / GUARD_DIR) if cfg.guard is not None else None
    measure = None
    if guard is not None:
        problems = gold_problems(cfg.task, cfg.num_examples, cfg.guard.problems, ctx.seed)
        sampled = hasattr(cfg, "max_completion_length")  # sft: no completion length, no KL
        prompts = [p["prompt"] for p in problems[: cfg.guard.kl_prompts]] if sampled else []
        frozen: list[Any] = []

        def reference(model: Any) -> Callable[[], Any]:
            if hasattr(model, "disable_adapter"):
                return lambda: adapter_off(model)
            if not frozen:  # loaded once, when first needed: the start policy as saved
                from eval.families import load_model

                frozen.append(load_model(start, str(model.device))[0])
            return lambda: contextlib.nullcontext(frozen[0])

        def measure(model: Any, step: int) -> Measurement:
            gold = gold_accuracy(model, tokenizer, cfg.task, problems, cfg.generation)
            kl = None
            if prompts:
                kl = sequence_kl(
                    model, reference(model), tokenizer, prompts, cfg.max_completion_length
                )
            return Measurement(step, gold, kl)

    control = None
    if getattr(cfg, "target_kl", None) is not None:
        path = ctx.stage_dir / GUARD_DIR / KL_FILE
        control = KLControl(cfg.beta, cfg.target_kl, cfg.kl_horizon, path)

    return guard_callback(guard, measure, control, log, lambda: checkpoint_steps(ctx), ctx.is_main)


def guarded_build(
    ctx: StageContext,
    cfg: Any,
    tokenizer: Any,
    start: Path,
    evaluation: dict[str, Any],
    make: Callable[[Any], Any],
) -> Callable[[Any], Any]:
    """`fit`'s build function for a stage that may have a guard (rlhf, sft): the trainer from
    `make(callback)` with the guard's callback added; `evaluation` (fit's keyword arguments)
    gets the guard's summary in its `evaluate`."""
    guards: list[Any] = []

    def build(callback: Any) -> Any:
        trainer = make(callback)
        guarded = guard_for(ctx, cfg, tokenizer, start, callback.log_metrics)
        if guarded is not None:  # the guard and the adaptive KL coefficient
            guarded.trainer = trainer
            trainer.add_callback(guarded)
            guards.append(guarded)
        return trainer

    scored = evaluation.get("evaluate")
    evaluation["evaluate"] = lambda: {
        **(scored() if scored else {}),
        **(guards[0].summary() if guards else {}),
    }
    return build


def checkpoint_steps(ctx: StageContext) -> set[int]:
    """The steps of the TRL checkpoints on disk (a resume may start from any of them)."""
    found = ctx.checkpoint_dir.glob("checkpoint-*") if ctx.checkpoint_dir.is_dir() else []
    return {int(p.name[11:]) for p in found if p.name[11:].isdigit()}
