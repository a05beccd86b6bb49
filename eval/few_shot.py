"""In-context learning as an eval row (`few_shot: k`): an eval's first model answers with k solved
training problems before every prompt, the baseline the post-trained models are compared with."""

from __future__ import annotations

from typing import Any

from data_prep.tasks import TaskBase
from pipeline.engine.errors import PipelineError


def few_shot_row(
    where: str, config: Any, task: TaskBase, stage: Any, device: str
) -> tuple[str, dict[str, Any]]:
    """The task metrics of an eval's first model under a `few_shot`-shot prompt (config: the
    eval stage's), and the row's label. A model with learned positions that a k-shot prompt
    would run past is a one-line error, not an index error mid-generation."""
    from data_prep.tasks import task_problems
    from eval.families import learned_positions, load_model
    from eval.tasks import EVAL_SEED, answer_tokens, few_shot_prefix, score_task

    model, tokenizer = load_model(stage.path, device)
    shots = few_shot_prefix(task, config.few_shot)
    limit = learned_positions(model.config.to_dict())
    splits = {"test": config.task_problems, "ood": config.ood_problems}  # what score_task answers
    drawn = [task_problems(task, split, num, EVAL_SEED) for split, num in splits.items() if num]
    need, longest = max(  # the prompt with the most tokens, counting its split's answer room
        (len(ids) + answer_tokens(group), len(ids))
        for group in drawn
        for ids in (tokenizer.encode(shots + p["prompt"]) for p in group)
    )
    if limit is not None and need > limit:
        raise PipelineError(
            f"stages.{where}.few_shot: a {config.few_shot}-shot prompt takes {longest} tokens, "
            f"and {stage.label} has {limit} positions; lower few_shot"
        )
    metrics = score_task(
        model, tokenizer, task, config.task_problems, config.pass_k, config.pass_k_problems,
        temperature=config.sample_temperature, k_values=config.k_values,
        ood_problems=config.ood_problems, shots=shots,
    )  # fmt: skip
    return f"{stage.label} {config.few_shot}-shot", metrics
