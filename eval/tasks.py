"""Task accuracy that can tell models apart: greedy pass@1 with a Wilson interval, pass@k by
sampling, answer-format rate, accuracy per subtask, and paired tests between models.

Prompts are the problems' plain text (as pretraining, SFT and RL see them); the answer is what
the task's scorer reads from the completion (for generated tasks, the digit string it starts with). The test split is fixed by a hash of each prompt, so no
stage ever trains on what is scored here. Every model of an eval stage answers the same problems
(seed EVAL_SEED), which is what makes the paired test valid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.tasks import TaskBase, score, task_problems
from eval.stats import mcnemar, pass_at_k, wilson_interval

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EVAL_SEED = 0  # the same held-out problems whatever the recipe's seed
# What the in-loop evaluator keeps of score_task (with the per-subtask accuracies).
IN_LOOP_METRICS = ("task_accuracy", "task_format_rate", "task_answer_rate", "task_partial_credit")


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
    samples: int = 1,
    temperature: float = 1.0,
) -> list[list[str]]:
    """`samples` completions of each prompt (greedy when samples == 1), batched, left-padded."""
    import torch

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer.encode(p, add_special_tokens=False)
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **(sampling if samples > 1 else {"do_sample": False}),
            )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        completions += [texts[i : i + samples] for i in range(0, len(texts), samples)]
    return completions


def answer_tokens(problems: list[dict[str, Any]]) -> int:
    """Enough new tokens for the longest answer and an end-of-text token (a token >= 1 char)."""
    return max(len(p["completion"]) for p in problems) + 1


def score_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskBase,
    num_problems: int,
    pass_k: int = 0,
    pass_k_problems: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Greedy accuracy (with a 95% interval), format rate, per-subtask accuracy and pass@k.

    Returns metrics plus `outcomes` (one row per problem with the completion and whether it was
    right, for paired tests) and `examples` (the first five).
    """
    problems = task_problems(task, "test", num_problems, EVAL_SEED)
    tokens = answer_tokens(problems)
    was_training = model.training
    model.eval()
    greedy = [c[0] for c in generate(model, tokenizer, [p["prompt"] for p in problems], tokens)]
    scores = [score(task, c, p["answer"], p) for c, p in zip(greedy, problems, strict=True)]
    correct = [exact == 1.0 for exact, _ in scores]
    low, high = wilson_interval(sum(correct), len(problems))
    metrics: dict[str, Any] = {
        "task_accuracy": sum(correct) / len(problems),
        "task_accuracy_low": low,
        "task_accuracy_high": high,
        "task_format_rate": sum(map(task.is_bare, greedy)) / len(problems),
        "task_answer_rate": sum(task.parse(c) is not None for c in greedy) / len(problems),
        "task_partial_credit": sum(partial for _, partial in scores) / len(problems),
        "task_problems": len(problems),
    }
    for subtask in sorted({p["subtask"] for p in problems}):
        picked = [ok for ok, p in zip(correct, problems, strict=True) if p["subtask"] == subtask]
        metrics[f"task_accuracy/{subtask}"] = sum(picked) / len(picked)
    if pass_k > 1 and pass_k_problems:
        import torch

        torch.manual_seed(EVAL_SEED)  # the same samples for the same model, run after run
        sampled = problems[:pass_k_problems]
        drawn = generate(
            model, tokenizer, [p["prompt"] for p in sampled], tokens, batch_size=32,
            samples=pass_k, temperature=temperature,
        )  # fmt: skip
        hits = [
            sum(score(task, c, p["answer"], p)[0] == 1.0 for c in cs)
            for cs, p in zip(drawn, sampled, strict=True)
        ]
        metrics[f"task_pass_at_{pass_k}"] = sum(pass_at_k(pass_k, h, pass_k) for h in hits) / len(
            hits
        )
        metrics["task_sampled_accuracy"] = sum(hits) / (pass_k * len(hits))
    model.train(was_training)
    metrics["outcomes"] = [
        {"prompt": p["prompt"], "answer": p["answer"], "subtask": p["subtask"], "completion": c,
         "correct": ok}
        for p, c, ok in zip(problems, greedy, correct, strict=True)
    ]  # fmt: skip
    metrics["examples"] = [
        {"prompt": p["prompt"], "completion": c, "answer": p["answer"]}
        for p, c in list(zip(problems, greedy, strict=True))[:5]
    ]
    return metrics


def task_evaluator(
    task: TaskBase, tokenizer_dir: Path, num_problems: int
) -> Callable[[Any], dict[str, float]]:
    """An in-loop evaluator: greedy accuracy (overall and per subtask), the rates of bare and of
    any leading answers, and the mean partial credit of the live model on the first
    `num_problems` held-out problems, the same ones at every validation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def evaluate(model: Any) -> dict[str, float]:
        metrics = score_task(model, tokenizer, task, num_problems)
        return {
            key: float(value)
            for key, value in metrics.items()
            if key in IN_LOOP_METRICS or key.startswith("task_accuracy/")
        }

    return evaluate


def paired_tests(outcomes: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    """McNemar test of each model against the one before it (same problems, recipe order)."""
    names = list(outcomes)
    return {
        f"{later}_vs_{earlier}": mcnemar(outcomes[earlier], outcomes[later])
        for earlier, later in zip(names, names[1:], strict=False)
    }


def accuracy_table(
    results: dict[str, dict[str, Any]], tests: dict[str, dict[str, float]], task: TaskBase
) -> str:
    """One line per model: greedy accuracy with its 95% interval, pass@k, and the paired
    difference and p-value against the model on the line above."""
    scored = [(name, m) for name, m in results.items() if "task_accuracy" in m]
    width = max(len(name) for name, _ in scored)
    pass_key = next((k for k in scored[0][1] if k.startswith("task_pass_at_")), None)
    lines = [
        f"held-out {task.FAMILY} accuracy: greedy pass@1 of {scored[0][1]['task_problems']} "
        f"[95% interval]{', ' + pass_key.replace('task_pass_at_', 'pass@') if pass_key else ''}"
        ", McNemar vs the line above"
    ]
    for index, (name, m) in enumerate(scored):
        line = (
            f"{name:<{width}}  {100 * m['task_accuracy']:5.1f}% [{100 * m['task_accuracy_low']:4.1f}, "
            f"{100 * m['task_accuracy_high']:4.1f}]"
        )
        if pass_key and pass_key in m:
            line += f"  {100 * m[pass_key]:5.1f}%"
        test = tests.get(f"{name}_vs_{scored[index - 1][0]}") if index else None
        if test is not None:
            line += f"  {100 * test['difference']:+5.1f} pts  p={test['p_value']:.2g}"
        lines.append(line)
    return "\n".join(lines)
