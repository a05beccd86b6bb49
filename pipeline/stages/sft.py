"""Supervised fine-tuning with TRL's SFTTrainer, starting from the upstream pretrain export.

Data: `builtin:task` (prompt/completion from the train split of the stage's `task`; the test
split is never trained on) or a JSONL file in TRL's formats (conversational `messages`, or `prompt` and
`completion`). Loss on completions (assistant turns) only by default; packing as an option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.engine.context import StageContext
from pipeline.stages.posttrain import BUILTIN_TASK, TaskStageConfig


class Config(TaskStageConfig):
    """Fine-tune the nearest upstream model stage on prompt/completion or chat data."""

    kind: Literal["sft"] = "sft"
    completion_only_loss: bool = Field(True, description="no loss on prompt/user tokens")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD)")
    max_length: int = Field(128, ge=8, description="tokens per training row")


def training_rows(cfg: Config, seed: int, where: str) -> list[dict]:
    """The SFT rows: the task's prompt/completion pairs or the user's JSONL rows."""
    from data_prep.tasks import task_problems
    from pipeline.stages.posttrain import read_jsonl

    if cfg.data == BUILTIN_TASK:
        return [
            {"prompt": p["prompt"], "completion": p["completion"]}
            for p in task_problems(cfg.task, "train", cfg.num_examples, seed)
        ]
    rows = read_jsonl(cfg.data, (("messages",), ("prompt", "completion")), where)
    return rows[: cfg.num_examples]


def run(ctx: StageContext) -> None:
    """Train, export the HF model + tokenizer, record train loss and held-out accuracy."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipeline.stages.posttrain import (
        base_model_dir,
        dataset,
        fit,
        load_tokenizer,
        task_evaluation,
        training_arguments,
    )

    cfg: Config = ctx.config  # type: ignore[assignment]
    source = base_model_dir(ctx, ("pretrain", "sft"))
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    rows = training_rows(cfg, ctx.seed, f"stages.{ctx.name}")
    conversational = "messages" in rows[0]
    args = SFTConfig(
        **training_arguments(ctx, cfg, model),
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss and not conversational,
        assistant_only_loss=cfg.completion_only_loss and conversational,
        dataset_num_proc=None,
    )
    ctx.log.info(
        "SFT from %s on %d %s rows, %d steps", source.parent.name, len(rows),
        "chat" if conversational else "prompt/completion", cfg.max_steps,
    )  # fmt: skip
    fit(
        ctx,
        tokenizer,
        lambda callback: SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset(rows),
            processing_class=tokenizer,
            callbacks=[callback],
        ),
        {"loss": "train_loss", "train_loss": "mean_train_loss"},
        **task_evaluation(ctx, cfg, tokenizer),
    )
