"""Reward modelling with TRL's RewardTrainer: a scalar head on the upstream model, trained on pairs.

Data: `builtin:task` (the right answer chosen, a near miss rejected; the task's train split) or
a JSONL file of `chosen`/`rejected` rows (with an optional `prompt`). Scored by pairwise accuracy
on held-out pairs: the task's test split, or every tenth row of a JSONL file (never trained on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from data_prep.tasks import TaskBase
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.stages.base_model import MODEL_INPUT, model_problems
from pipeline.stages.chat import template_problems
from pipeline.stages.posttrain import BUILTIN_TASK, TrainerStageConfig
from pipeline.stages.rows import draws_problems, pairs_problem

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HOLDOUT_EVERY = 10  # every tenth row of a user's JSONL is held out


class Config(TrainerStageConfig):
    """Train a reward model on chosen/rejected pairs from the nearest upstream model stage."""

    kind: Literal["reward"] = "reward"
    data_keys = (("chosen", "rejected"),)
    max_length: int = Field(64, ge=8, description="tokens per prompt + response")
    eval_pairs: int = Field(200, ge=1, description="held-out pairs scored after training")
    pairs: str | None = Field(
        None, description="a preferences stage whose pairs to train on, instead of `data`"
    )

    @model_validator(mode="after")
    def _one_source_of_pairs(self) -> Config:
        if self.pairs is not None and self.data != BUILTIN_TASK:
            raise ValueError("pairs and data both name the training pairs; keep one")
        return self


def preference_rows(
    data: str,
    task: TaskBase,
    num: int,
    seed: int,
    where: str,
    held_out: int = 0,
    pairs: Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows with prompt/chosen/rejected (prompt may be empty):
    `num` and `held_out` of the task's splits, or the rows of a JSONL file or of a preferences
    stage's export (`pairs`) with every tenth held out."""
    from data_prep.tasks import preference_pairs
    from pipeline.stages.preferences import read_pairs
    from pipeline.stages.rows import read_jsonl

    if pairs is not None:
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_pairs(pairs)]
        held = rows[::HOLDOUT_EVERY]
        return [r for i, r in enumerate(rows) if i % HOLDOUT_EVERY][:num], held
    if data == BUILTIN_TASK:
        return (
            preference_pairs(task, "train", num, seed),
            preference_pairs(task, "test", held_out, seed + 1),
        )
    rows = [
        {"prompt": r.get("prompt", ""), "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in read_jsonl(data, (("chosen", "rejected"),), where)
    ]
    held_out = rows[::HOLDOUT_EVERY]
    train = [r for i, r in enumerate(rows) if i % HOLDOUT_EVERY]
    return train[:num], held_out


def pairwise_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, Any]]
) -> dict[str, float]:
    """Fraction of pairs whose chosen response scores above the rejected one, and mean margin."""
    from pipeline.stages.reward_models import reward_scores

    chosen = reward_scores(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = reward_scores(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
    }


def run(ctx: StageContext) -> None:
    """Train, export the reward model + tokenizer, record held-out pairwise accuracy."""
    import torch
    from trl import RewardConfig, RewardTrainer

    from pipeline.stages.base_model import base_model, causal_lm_twin, load_tokenizer, peft_config
    from pipeline.stages.posttrain import fit, training_arguments
    from pipeline.stages.reward_models import load_reward_model
    from pipeline.stages.rows import dataset
    from pipeline.train.adapter_init import seed_head

    cfg: Config = ctx.config  # type: ignore[assignment]
    source = base_model(ctx)
    tokenizer = load_tokenizer(source, cfg.chat_template)
    # The arguments first: under FSDP2 or ZeRO-3 the model is then loaded sharded.
    common = training_arguments(ctx, cfg, causal_lm_twin(source))
    args = RewardConfig(**common, max_length=cfg.max_length)
    model = training_reward_model(source.path, args, cfg.adapter)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = ctx.input("pairs").path if cfg.pairs else None
    train, held_out = preference_rows(
        cfg.data, cfg.task, cfg.num_examples, ctx.seed, f"stages.{ctx.name}", cfg.eval_pairs, pairs
    )
    columns = ("prompt", "chosen", "rejected")
    ctx.log.info("reward model from %s on %d pairs", source.label, len(train))

    def evaluate() -> dict[str, Any]:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scored = pairwise_accuracy(
            load_reward_model(ctx.export_dir, device), tokenizer, held_out[: cfg.eval_pairs]
        )
        ctx.log.info("held-out pairwise accuracy %.1f%%", 100 * scored["pairwise_accuracy"])
        return scored

    def build(callback: Any) -> Any:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=dataset(train, lambda r: {k: r[k] for k in columns}),
            processing_class=tokenizer,
            callbacks=[callback],
            **peft_config(cfg, "SEQ_CLS", model),
        )
        # The score head (in no causal LM's files): the same draw on every engine, and the
        # seed is what makes ensemble members differ.
        seed_head(trainer.model, ctx.seed)
        return trainer

    fit(
        ctx,
        tokenizer,
        build,
        {"loss": "train_loss", "accuracy": "train_accuracy"},
        evaluate=evaluate,
        headline="pairwise_accuracy",
    )


def training_reward_model(model_dir: Path, args: Any, adapter: Any) -> Any:
    """model_dir's model with a fresh one-output score head, to train: sharded as `args` train
    it (pipeline.train.trl_load), else whole."""
    from pipeline.stages.reward_models import load_reward_model
    from pipeline.train.distributed import hf_zero3_off
    from pipeline.train.trl_load import load_for_trainer, sequence_classifier

    sharded = load_for_trainer(model_dir, args, adapter, sequence_classifier(model_dir))
    if sharded is not None:
        return sharded
    with hf_zero3_off():  # DeepSpeed partitions it at initialize
        return load_reward_model(model_dir)


def plan_problems(view: PlanView) -> list[str]:
    """The model's checks, the chat template's syntax and the pairs drawn from the task."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = model_problems(view) + template_problems(cfg.chat_template, f"{where}.chat_template")
    if cfg.data != BUILTIN_TASK or cfg.pairs is not None:
        return problems
    if problem := pairs_problem(cfg.task, f"{where}.task"):
        return [*problems, problem]
    draws = {"num_examples": ("train", cfg.num_examples), "eval_pairs": ("test", cfg.eval_pairs)}
    return problems + draws_problems(cfg.task, draws, where)


SPEC = StageSpec(
    Config,
    run,
    output="reward_model",
    inputs=(
        MODEL_INPUT,
        Input("pairs", ("preferences",), field="pairs", required=False, nearest=False),
    ),
    plan_check=plan_problems,
)
