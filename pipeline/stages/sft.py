"""Supervised fine-tuning with TRL's SFTTrainer, from an upstream model stage or a model directory.

Data: `builtin:task` (prompt/completion from the train split of the stage's `task`; the test
split is never trained on) or a JSONL file in TRL's formats (conversational `messages`, or `prompt` and
`completion`). Loss on completions (assistant turns) only by default; packing as an option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.engine.context import StageContext
from pipeline.engine.inputs import PlanView, StageSpec
from pipeline.stages.base_model import MODEL_INPUT, model_problems
from pipeline.stages.chat import template_problems
from pipeline.stages.posttrain import BUILTIN_TASK, TaskStageConfig, generation_problems
from pipeline.stages.rl_guard import GuardConfig
from pipeline.stages.rows import draws_problems, task_stage_draws


class Config(TaskStageConfig):
    """Fine-tune a model (upstream stage or directory) on prompt/completion or chat data."""

    kind: Literal["sft"] = "sft"
    data_keys = (("messages",), ("prompt", "completion"))
    completion_only_loss: bool = Field(True, description="no loss on prompt/user tokens")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD)")
    max_length: int = Field(128, ge=8, description="tokens per training row")
    guard: GuardConfig | None = Field(
        None, json_schema_extra={"fingerprint": "when_set"},
        description="early stopping on held-out accuracy: score task problems held apart from "
        "the training rows every N steps, stop when the score stops rising, export the best "
        "checkpoint (pipeline.stages.rl_guard; kl_prompts is ignored: SFT samples nothing)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _guard_needs_the_task(self) -> Config:
        if self.guard is not None and self.data != BUILTIN_TASK:
            raise ValueError("guard scores the task's problems, so it needs data: builtin:task")
        return self


def training_rows(cfg: Config, seed: int, where: str) -> list[dict]:
    """The SFT rows: the task's prompt/completion pairs or the user's JSONL rows."""
    from data_prep.tasks import task_problems
    from pipeline.stages.rows import read_jsonl

    if cfg.data == BUILTIN_TASK:
        return [
            {"prompt": p["prompt"], "completion": p["completion"]}
            for p in task_problems(cfg.task, "train", cfg.num_examples, seed)
        ]
    rows = read_jsonl(cfg.data, (("messages",), ("prompt", "completion")), where)
    return rows[: cfg.num_examples]


def run(ctx: StageContext) -> None:
    """Train, export the HF model + tokenizer, record train loss and held-out accuracy."""
    from trl import SFTConfig, SFTTrainer

    from pipeline.stages.base_model import (
        base_model,
        causal_lm_twin,
        load_causal_lm,
        load_tokenizer,
        peft_config,
    )
    from pipeline.stages.chat import assistant_masked_rows
    from pipeline.stages.posttrain import fit, task_evaluation, training_arguments
    from pipeline.stages.rl_guard import guarded_build
    from pipeline.stages.rows import dataset

    cfg: Config = ctx.config  # type: ignore[assignment]
    where = f"stages.{ctx.name}"
    source = base_model(ctx)
    tokenizer = load_tokenizer(source, cfg.chat_template)
    rows = training_rows(cfg, ctx.seed, where)
    conversational = "messages" in rows[0]
    if conversational and cfg.completion_only_loss:
        # Assistant spans found by rendering each conversation turn by turn with the model's own
        # template: no `{% generation %}` markers needed (TRL cannot patch most user templates).
        rows = assistant_masked_rows(tokenizer, rows, cfg.max_length, where)
    args = SFTConfig(  # before the model: a ZeRO-3 launch loads it partitioned
        **training_arguments(ctx, cfg, causal_lm_twin(source)),
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss and not conversational,
        dataset_num_proc=None,
    )
    model = load_causal_lm(source, where, cfg.adapter, args)
    ctx.log.info(
        "SFT%s from %s on %d %s rows, %d steps", " (LoRA)" if cfg.adapter else "", source.label,
        len(rows), "chat" if conversational else "prompt/completion", cfg.max_steps,
    )  # fmt: skip
    evaluation = task_evaluation(ctx, cfg, tokenizer)
    make = lambda callback: SFTTrainer(  # noqa: E731
        model=model,
        args=args,
        train_dataset=dataset(rows),
        processing_class=tokenizer,
        callbacks=[callback],
        **peft_config(cfg, model=model),
    )
    if cfg.guard is not None:  # early stopping on held-apart problems, the best one exported
        make = guarded_build(ctx, cfg, tokenizer, source.path, evaluation, make)
    fit(ctx, tokenizer, make, {"loss": "train_loss", "train_loss": "mean_train_loss"}, **evaluation)


def plan_problems(view: PlanView) -> list[str]:
    """The model's checks, the chat template's syntax and the problems drawn from the task."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = model_problems(view) + template_problems(cfg.chat_template, f"{where}.chat_template")
    problems += generation_problems(cfg, view.world_size, where)
    return problems + draws_problems(cfg.task, task_stage_draws(cfg), where)


SPEC = StageSpec(Config, run, output="lm", inputs=(MODEL_INPUT,), plan_check=plan_problems)
