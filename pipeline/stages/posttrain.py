"""What the post-training stages (sft, reward, rlhf) share: data, base model, TRL wiring, export.

TRL trainers do the training; this module only hands them our launch settings (through
`pipeline.train.distributed.trainer_arguments`), our tracker (a callback, rank 0) and our directories
(checkpoints under the stage's `checkpoints/`, the export under `export/`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from data_prep.task_base import task_file_signature
from data_prep.tasks import ArithmeticTask, TaskBase, TaskConfig
from eval.vllm_engine import GenerationConfig, plan_problem
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.locations import Location
from pipeline.engine.schema_errors import PathText
from pipeline.engine.tracking import Tracker
from pipeline.stages.base_model import (
    AdapterConfig,
    base_model,
    exported_template,
    from_user_model,
    keep_tokenizer_files,
)
from pipeline.stages.rows import BUILTIN_TASK, first_row
from pipeline.train.config import TrainingConfig
from pipeline.train.optim import OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

# Flat optimiser keys of earlier versions -> their place now (one spelling in every stage).
RENAMED_KEYS = {
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip",
    "warmup_steps": "schedule.warmup_steps",
}


class TrainerOptimConfig(OptimConfig):
    """pretrain's optimiser keys with the TRL trainers' defaults (no decay, beta2 0.999)."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW second-moment decay")


class TrainerScheduleConfig(ScheduleConfig):
    """pretrain's schedule keys with the TRL trainers' defaults (no warmup, cosine to 0)."""

    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")


class TrainerStageConfig(TrainingConfig, StageConfig):
    """Fields every TRL-trained stage has: data, steps, batch, optimiser, logging, checkpoints."""

    model: str | Location | None = Field(
        None,
        description="the model to start from: a stage name, or {path: DIR} (a Hugging Face "
        "model directory); default: the nearest upstream language-model stage",
    )
    adapter: AdapterConfig | None = Field(
        None, description="train a LoRA adapter (peft) instead of every weight"
    )
    chat_template: PathText | None = Field(
        None, description="a Jinja chat template file used instead of the model's own"
    )
    task: TaskConfig = Field(
        default_factory=ArithmeticTask, description="the verifiable task: name and its options"
    )
    data: str = Field(BUILTIN_TASK, description="builtin:task (train problems of `task`) or JSONL")
    num_examples: int = Field(2000, ge=1, description="training examples drawn from `data`")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(16, ge=1, description="sequences per rank per micro step")
    optim: TrainerOptimConfig = Field(
        default_factory=TrainerOptimConfig, description="AdamW settings, as in pretrain"
    )
    schedule: TrainerScheduleConfig = Field(
        default_factory=TrainerScheduleConfig,
        description="the schedule keys of pretrain (run by the TRL trainer's scheduler)",
    )
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(1, ge=1, description="newest checkpoints kept")

    distributed = True

    @model_validator(mode="before")
    @classmethod
    def _renamed_optim_keys(cls, data: Any) -> Any:
        for old, new in RENAMED_KEYS.items():
            if isinstance(data, dict) and old in data:
                raise ValueError(f"`{old}` moved to `{new}` (as in pretrain); write {new}: ...")
        return data

    # Key sets a row of a JSONL `data` file may hold (one of them); each stage kind says its own.
    data_keys: ClassVar[tuple[tuple[str, ...], ...]] = (("prompt",),)

    def data_signature(self) -> dict[str, Any]:
        """The task generator's version (and a task file's stat), or the JSONL file's size and
        mtime: a change to the training data reruns the stage."""
        from data_prep.tasks import GENERATOR_VERSION

        task = task_file_signature(self.task)
        if self.data == BUILTIN_TASK:
            return {"task_generator": GENERATOR_VERSION, **task}
        path = Path(self.data)
        stat = path.stat() if path.is_file() else None
        return {"file": [str(path), stat.st_size, stat.st_mtime_ns] if stat else None, **task}

    def check_inputs(self) -> None:
        """The task's file (a JSONL task) and the `data` file exist and their first row fits."""
        self.task.check_inputs()
        if self.data != BUILTIN_TASK:
            first_row(self.data, self.data_keys)

    @field_validator("data")
    @classmethod
    def _data(cls, data: str) -> str:
        if data == "builtin:arithmetic":
            raise ValueError(f"renamed: use data: {BUILTIN_TASK} with task: {{name: arithmetic}}")
        if data.startswith("builtin:") and data != BUILTIN_TASK:
            raise ValueError(f"unknown built-in data; use {BUILTIN_TASK} or a JSONL path")
        return data


class TaskStageConfig(TrainerStageConfig):
    """A TRL stage that trains a policy on a task: held-out accuracy after and during training."""

    eval_problems: int = Field(200, ge=0, description="held-out task problems scored; 0: off")
    eval_every: int = Field(
        0, ge=0, description="score held-out problems every N steps (and at step 0); 0: off"
    )
    eval_every_problems: int = Field(100, ge=1, description="held-out problems per periodic eval")
    generation: GenerationConfig = Field(
        GenerationConfig(), json_schema_extra={"fingerprint": "when_set"},
        description="the engine that answers the held-out problems (eval_problems, eval_every, "
        "the guard's gold): hf, or vllm on a snapshot of the weights (eval.vllm_engine)",
    )  # fmt: skip


def generation_problems(cfg: TaskStageConfig, world_size: int, where: str) -> list[str]:
    """The plan's check of a task stage's `generation`: vLLM exists where named, and evaluates
    a model in training (eval_every, the guard) from one process only."""
    live = bool(cfg.eval_every or getattr(cfg, "guard", None))
    problem = plan_problem(cfg.generation, f"{where}.generation", world_size if live else 0)
    return [problem] if problem else []


def task_evaluation(
    ctx: StageContext, cfg: TaskStageConfig, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """`fit` keyword arguments for the held-out evaluation of a task stage."""
    periodic = (
        PeriodicEval(tokenizer, cfg.task, cfg.eval_every_problems, cfg.eval_every, cfg.generation)
        if cfg.eval_every and cfg.data == BUILTIN_TASK
        else None
    )
    if not cfg.eval_problems:
        return {"periodic": periodic}
    return {
        "evaluate": lambda: held_out_accuracy(
            ctx, tokenizer, cfg.task, cfg.eval_problems, cfg.generation
        ),
        "headline": "task_accuracy",
        "periodic": periodic,
    }


def training_arguments(ctx: StageContext, cfg: TrainerStageConfig, model: Any) -> dict[str, Any]:
    """TrainingArguments fields shared by every TRL config: launch, schedule, logging, saving."""
    import torch

    from pipeline.train.distributed import TrainShape, resolve_precision, trainer_arguments
    from pipeline.train.optim import trainer_optimizer, trainer_schedule

    shape = TrainShape(
        cfg.micro_batch_size,
        cfg.grad_accum_steps,
        int(os.environ.get("WORLD_SIZE", "1")),
        resolve_precision(cfg.precision),
        cfg.optim.grad_clip,
    )
    launch = ctx.recipe.launch_for(ctx.name)
    return {
        **trainer_arguments(launch, shape, sorted(getattr(model, "_no_split_modules", None) or [])),
        "output_dir": str(ctx.checkpoint_dir),
        "max_steps": cfg.max_steps,
        **trainer_optimizer(cfg.optim),
        **trainer_schedule(cfg.schedule, cfg.max_steps),
        "logging_steps": cfg.log_every,
        "save_strategy": "steps",
        "save_steps": cfg.checkpoint_every,
        "save_total_limit": cfg.keep_checkpoints,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": ctx.seed,
        "data_seed": ctx.seed,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        # every adapter weight takes part in each forward: no search for unused ones under DDP
        **({"ddp_find_unused_parameters": False} if cfg.adapter is not None else {}),
    }


def tracker_callback(tracker: Tracker, periodic: PeriodicEval | None = None) -> Any:
    """A TrainerCallback that sends the trainer's numeric logs to our tracker as `train/*` and,
    with `periodic`, held-out task metrics as `eval/*` at step 0 and every `periodic.every` steps.
    """
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        """Forwards `on_log` rows (rank 0) and keeps the last value of every key."""

        def __init__(self) -> None:
            self.last: dict[str, float] = {}

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            """Other callbacks' metrics (the rlhf guard's) to the same tracker."""
            tracker.log(metrics, step=step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if state.is_world_process_zero and numeric:
                self.last.update(numeric)
                tracker.log({f"train/{k}": v for k, v in numeric.items()}, step=state.global_step)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if periodic is not None and state.global_step == 0:
                self._evaluate(state, kwargs["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if periodic is not None and state.global_step % periodic.every == 0:
                self._evaluate(state, kwargs["model"])

        def _evaluate(self, state: Any, model: Any) -> None:
            # Every rank scores the same problems (no collective is skipped on any rank).
            metrics = periodic.evaluate(model)
            if state.is_world_process_zero:
                tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.global_step)

    return TrackerCallback()


class PeriodicEval:
    """Greedy held-out accuracy of the policy being trained, every `every` steps."""

    def __init__(
        self, tokenizer: Any, task: TaskBase, num_problems: int, every: int,
        generation: GenerationConfig | None = None,
    ) -> None:  # fmt: skip
        self.tokenizer, self.task, self.num_problems, self.every = (
            tokenizer, task, num_problems, every
        )  # fmt: skip
        self.generation = generation

    def evaluate(self, model: Any) -> dict[str, float]:
        from eval.tasks import score_task
        from eval.vllm_engine import live_engine

        with live_engine(self.generation, model, self.tokenizer) as generator:
            scored = score_task(
                model, self.tokenizer, self.task, self.num_problems, generator=generator
            )
        kept = ("task_accuracy", "task_macro_accuracy", "task_thinking_chars")
        return {k: v for k, v in scored.items() if k.startswith(kept)}


def train_and_export(
    ctx: StageContext,
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    resume: str | None,
) -> None:
    """Train (resuming when a checkpoint exists) and save model + tokenizer into the export dir,
    with provenance.json (the resolved stage config, the code and package versions)."""
    from transformers.trainer_callback import PrinterCallback

    from pipeline.engine.errors import Preempted
    from pipeline.train.export import export_trainer
    from pipeline.train.runtime import preemption_callback

    trainer.remove_callback(PrinterCallback)  # our tracker callback logs; no raw dicts on stdout
    every = getattr(trainer.args, "num_iterations", 1)  # GRPO reuses a batch for this many
    trainer.add_callback(stop := preemption_callback(trainer.accelerator, ctx.name, every))
    if resume:
        ctx.log.info("resuming from %s", Path(resume).name)
    trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:
        raise Preempted(f"stages.{ctx.name}: preempted after step {stop.stopped_at}; "
                        f"checkpoint saved, a rerun or requeue resumes from it")  # fmt: skip
    source = base_model(ctx)
    keep = None
    if from_user_model(ctx.recipe, source):  # a user's model keeps its tokenizer files as they were
        template = exported_template(source, tokenizer, ctx.config.chat_template)  # type: ignore[attr-defined]
        keep = partial(keep_tokenizer_files, source.path, chat_template=template)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the export gathers whole weights
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    config = ctx.config.model_dump(mode="json")
    export_trainer(trainer, tokenizer, ctx.export_dir, config, keep_tokenizer=keep)


def fit(
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    build: Callable[[Any], Trainer],
    keys: dict[str, str],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    headline: str = "train_loss",
    periodic: PeriodicEval | None = None,
) -> dict[str, Any]:
    """The part every TRL stage shares: train (resuming), export, evaluate, record the summary.

    `build(callback)` makes the trainer with our tracker callback; `keys` renames the trainer's
    last logged values for the summary; `evaluate()` (rank 0, after the export) adds held-out
    metrics; `periodic` scores held-out problems during training.
    """
    from pipeline.stages.trl_checkpoints import prepare_checkpoints, saved_marker_callback
    from pipeline.train.adapter_init import seed_adapter
    from pipeline.train.distributed import hf_zero3_off, shard_on_cpu

    resume = prepare_checkpoints(ctx)
    with ctx.tracker() as tracker:
        callback = tracker_callback(tracker, periodic)
        trainer = build(callback)
        trainer.add_callback(saved_marker_callback())
        if getattr(ctx.config, "adapter", None) is not None:  # the same start on every engine
            seed_adapter(trainer.model, ctx.seed)
        shard_on_cpu(trainer)
        train_and_export(ctx, trainer, tokenizer, resume)
        summary: dict[str, Any] = last_metrics(callback, keys)
        if evaluate is not None and ctx.is_main:
            # Training is over: rank 0 loads the export whole (under ZeRO-3 transformers would
            # otherwise partition it over ranks that do not take part, and wait for them).
            with hf_zero3_off():
                summary |= evaluate()
        tracker.summary(summary)
    ctx.write_summary(summary, headline=headline)
    return summary


def held_out_accuracy(
    ctx: StageContext, tokenizer: PreTrainedTokenizerBase, task: TaskBase, num: int,
    generation: GenerationConfig | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Greedy accuracy (with its 95% interval) of the exported model on held-out problems."""
    import torch

    from eval.families import load_model
    from eval.tasks import score_task
    from eval.vllm_engine import engine_for

    model, _ = load_model(ctx.export_dir, "cuda" if torch.cuda.is_available() else "cpu")
    with engine_for(generation or GenerationConfig(), ctx.export_dir, model, tokenizer) as gen:
        scored = score_task(model, tokenizer, task, num, generator=gen)
    ctx.log.info(
        "held-out %s accuracy %.1f%% [%.1f, %.1f] of %d", task.FAMILY,
        100 * scored["task_accuracy"], 100 * scored["task_accuracy_low"],
        100 * scored["task_accuracy_high"], num,
    )  # fmt: skip
    return {k: v for k, v in scored.items() if k.startswith("task_accuracy")}


def last_metrics(callback: Any, keys: dict[str, str]) -> dict[str, float]:
    """The callback's last logged values, renamed by `keys` (trainer key -> summary key)."""
    return {ours: callback.last[theirs] for theirs, ours in keys.items() if theirs in callback.last}
