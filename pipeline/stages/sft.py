"""Supervised fine-tuning with TRL's SFTTrainer, starting from the upstream pretrain export.

Data: `builtin:arithmetic` (prompt/completion from the train split; the test split is never
trained on) or a JSONL file in TRL's formats (conversational `messages`, or `prompt` and
`completion`). Loss on completions (assistant turns) only by default; packing as an option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.context import StageContext
from pipeline.posttrain import BUILTIN_ARITHMETIC, TrainerStageConfig


class Config(TrainerStageConfig):
    """Fine-tune the nearest upstream model stage on prompt/completion or chat data."""

    kind: Literal["sft"] = "sft"
    completion_only_loss: bool = Field(True, description="no loss on prompt/user tokens")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD)")
    max_length: int = Field(128, ge=8, description="tokens per training row")
    eval_problems: int = Field(200, ge=0, description="held-out arithmetic problems; 0: off")


def training_rows(cfg: Config, seed: int, where: str) -> list[dict]:
    """The SFT rows: arithmetic prompt/completion pairs or the user's JSONL rows."""
    from data_prep.arithmetic import arithmetic_problems
    from pipeline.posttrain import read_jsonl

    if cfg.data == BUILTIN_ARITHMETIC:
        return [
            {"prompt": p["prompt"], "completion": f" {p['completion']}"}
            for p in arithmetic_problems("train", cfg.num_examples, seed)
        ]
    rows = read_jsonl(cfg.data, (("messages",), ("prompt", "completion")), where)
    return rows[: cfg.num_examples]


def run(ctx: StageContext) -> None:
    """Train, export the HF model + tokenizer, record train loss and held-out accuracy."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipeline.posttrain import (
        base_model_dir,
        dataset,
        fit,
        held_out_accuracy,
        load_tokenizer,
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
        evaluate=(lambda: held_out_accuracy(ctx, tokenizer, cfg.eval_problems))
        if cfg.eval_problems
        else None,
        headline="arithmetic_accuracy" if cfg.eval_problems else "train_loss",
    )
