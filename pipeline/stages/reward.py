"""Reward modelling with TRL's RewardTrainer: a scalar head on the upstream model, trained on pairs.

Data: `builtin:task` (the right answer chosen, a near miss rejected; the task's train split) or
a JSONL file of `chosen`/`rejected` rows (with an optional `prompt`). Scored by pairwise accuracy
on held-out pairs: the task's test split, or every tenth row of a JSONL file (never trained on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from data_prep.tasks import TaskBase
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import PlanView, StageSpec
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


def preference_rows(
    data: str, task: TaskBase, num: int, seed: int, where: str, held_out: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows with prompt/chosen/rejected (prompt may be empty):
    `num` and `held_out` of the task's splits, or a JSONL file's rows with every tenth held out."""
    from data_prep.tasks import preference_pairs
    from pipeline.stages.rows import read_jsonl

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
    import torch

    def score(text: str) -> float:
        ids = tokenizer.encode(text + tokenizer.eos_token, add_special_tokens=False)
        with torch.inference_mode():
            return model(torch.tensor([ids], device=model.device)).logits[0, 0].item()

    margins = [score(p["prompt"] + p["chosen"]) - score(p["prompt"] + p["rejected"]) for p in pairs]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
    }


def load_reward_model(path: Any, device: str = "cpu") -> PreTrainedModel:
    """A sequence-classification model with one output (the reward) from an HF directory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32
    )
    return model.to(device).eval()


def run(ctx: StageContext) -> None:
    """Train, export the reward model + tokenizer, record held-out pairwise accuracy."""
    from trl import RewardConfig, RewardTrainer

    from pipeline.stages.base_model import base_model, load_tokenizer, peft_config
    from pipeline.stages.posttrain import fit, training_arguments
    from pipeline.stages.rows import dataset

    cfg: Config = ctx.config  # type: ignore[assignment]
    source = base_model(ctx)
    tokenizer = load_tokenizer(source, cfg.chat_template)
    model = load_reward_model(source.path)
    model.config.pad_token_id = tokenizer.pad_token_id
    train, held_out = preference_rows(
        cfg.data, cfg.task, cfg.num_examples, ctx.seed, f"stages.{ctx.name}", cfg.eval_pairs
    )
    args = RewardConfig(**training_arguments(ctx, cfg, model), max_length=cfg.max_length)
    columns = ("prompt", "chosen", "rejected")
    ctx.log.info("reward model from %s on %d pairs", source.label, len(train))

    def evaluate() -> dict[str, Any]:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        scored = pairwise_accuracy(
            load_reward_model(ctx.export_dir, device), tokenizer, held_out[: cfg.eval_pairs]
        )
        ctx.log.info("held-out pairwise accuracy %.1f%%", 100 * scored["pairwise_accuracy"])
        return scored

    fit(
        ctx,
        tokenizer,
        lambda callback: RewardTrainer(
            model=model,
            args=args,
            train_dataset=dataset(train, lambda r: {k: r[k] for k in columns}),
            processing_class=tokenizer,
            callbacks=[callback],
            **peft_config(cfg, "SEQ_CLS"),
        ),
        {"loss": "train_loss", "accuracy": "train_accuracy"},
        evaluate=evaluate,
        headline="pairwise_accuracy",
    )


def plan_problems(view: PlanView) -> list[str]:
    """The model's checks, the chat template's syntax and the pairs drawn from the task."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = model_problems(view) + template_problems(cfg.chat_template, f"{where}.chat_template")
    if cfg.data != BUILTIN_TASK:
        return problems
    if problem := pairs_problem(cfg.task, f"{where}.task"):
        return [*problems, problem]
    draws = {"num_examples": ("train", cfg.num_examples), "eval_pairs": ("test", cfg.eval_pairs)}
    return problems + draws_problems(cfg.task, draws, where)


SPEC = StageSpec(
    Config, run, output="reward_model", inputs=(MODEL_INPUT,), plan_check=plan_problems
)
