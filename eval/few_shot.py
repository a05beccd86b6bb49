"""In-context learning as an eval row (`few_shot: k`): an eval's first model answers with k solved
training problems before every prompt, the baseline the post-trained models are compared with."""

from __future__ import annotations

from typing import Any

from data_prep.tasks import TaskBase
from pipeline.engine.errors import PipelineError


def check_positions(
    where: str,
    config: Any,
    task: TaskBase,
    label: str,
    model: Any,
    tokenizer: Any,
    shots: str = "",
) -> None:
    """Refuse, in one line, task scoring whose longest prompt (after `shots`) and answer room run
    past the model's learned positions (a GPT-2 would raise an index error mid-generation)."""
    from data_prep.tasks import task_problems
    from eval.families import learned_positions
    from eval.tasks import EVAL_SEED, answer_tokens

    limit = learned_positions(model.config.to_dict())
    if limit is None:
        return
    splits = {"test": config.task_problems, "ood": config.ood_problems}  # what score_task answers
    drawn = [task_problems(task, split, num, EVAL_SEED) for split, num in splits.items() if num]
    need, longest, room = max(  # the prompt with the most tokens, counting its split's answer room
        (len(ids) + answer_tokens(group), len(ids), answer_tokens(group))
        for group in drawn
        for ids in (tokenizer.encode(shots + p["prompt"]) for p in group)
    )
    if need <= limit:
        return
    if shots:
        raise PipelineError(
            f"stages.{where}.few_shot: a {config.few_shot}-shot prompt takes {longest} tokens, "
            f"and {label} has {limit} positions; lower few_shot"
        )
    raise PipelineError(
        f"stages.{where}.task: a prompt of {longest} tokens and {room} tokens of answer room "
        f"need {need} positions, and {label} has {limit}; use a task with shorter problems or a "
        f"model with more positions (its seq_len)"
    )


def stage_task_metrics(
    config: Any, task: TaskBase, stage: Any, model: Any, tokenizer: Any, shots: str = ""
) -> dict[str, Any]:
    """score_task with an eval stage's settings (config) on one of its models, generating with
    the stage's engine (`generation`)."""
    from eval.tasks import score_task
    from eval.vllm_engine import engine_for

    with engine_for(config.generation, stage.path, model, tokenizer) as generator:
        return score_task(
            model, tokenizer, task, config.task_problems, config.pass_k, config.pass_k_problems,
            temperature=config.sample_temperature, k_values=config.k_values,
            ood_problems=config.ood_problems, shots=shots, generator=generator,
        )  # fmt: skip


def few_shot_row(
    where: str, config: Any, task: TaskBase, stage: Any, device: str
) -> tuple[str, dict[str, Any]]:
    """The task metrics of an eval's first model under a `few_shot`-shot prompt (config: the
    eval stage's), and the row's label. A model with learned positions that a k-shot prompt
    would run past is a one-line error, not an index error mid-generation."""
    from eval.families import load_model
    from eval.tasks import few_shot_prefix

    model, tokenizer = load_model(stage.path, device)
    shots = few_shot_prefix(task, config.few_shot)
    check_positions(where, config, task, stage.label, model, tokenizer, shots)
    metrics = stage_task_metrics(config, task, stage, model, tokenizer, shots)
    return f"{stage.label} {config.few_shot}-shot", metrics
