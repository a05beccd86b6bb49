"""Task accuracy that can tell models apart: greedy pass@1 with a Wilson interval, its macro
average over subtasks (eval.macro), pass@k and maj@k by sampling (eval.test_time), answer-format
rate, accuracy per subtask, completion and thinking lengths, accuracy out of distribution, and
paired tests between models.

Prompts are the problems' plain text (as pretraining, SFT and RL see them); the answer is what
the task's scorer reads from the completion (for generated tasks, the digit string it starts
with; for cot ones, after `</think>`). The test split is fixed by a hash of each prompt, so no
stage ever trains on what is scored here; the out-of-distribution split lies outside the task's
space. Every model of an eval stage answers the same problems (seed EVAL_SEED), which is what
makes the paired tests valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.tasks import TaskBase, score, task_problems
from eval.generation import Generator, generate, hf_generator  # noqa: F401 (generate: re-exported)
from eval.macro import macro_average, macro_paired_test, subtask_counts
from eval.stats import mcnemar, wilson_interval
from eval.test_time import PASS_KEY, k_list, length_metrics, sampled_metrics

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EVAL_SEED = 0  # the same held-out problems whatever the recipe's seed
# What the in-loop evaluator keeps of score_task (with the per-subtask accuracies).
IN_LOOP_METRICS = ("task_accuracy", "task_format_rate", "task_answer_rate", "task_partial_credit")


def few_shot_prefix(task: TaskBase, shots: int) -> str:
    """`shots` solved training problems (fixed by EVAL_SEED), one per line, each written as
    pretraining and SFT rows are (cot ones with their worked steps): the in-context examples
    of a k-shot prompt. Training problems, so never one that is scored."""
    from data_prep.tasks import format_problem

    return "".join(format_problem(p) + "\n" for p in task_problems(task, "train", shots, EVAL_SEED))


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
    k_values: Sequence[int] | None = None,
    ood_problems: int = 0,
    shots: str = "",
    generator: Generator | None = None,
) -> dict[str, Any]:
    """Greedy accuracy (micro, with a 95% interval, and macro over subtasks), format rate,
    per-subtask accuracy, lengths, pass@k and maj@k for k of `k_values` (see
    eval.test_time.k_list) from `pass_k` samples of the first `pass_k_problems`, and greedy
    accuracy on `ood_problems` out-of-distribution problems.

    Returns metrics plus `outcomes` (one row per problem with the completion and whether it was
    right, for paired tests) and `examples` (the first five). `shots` (see few_shot_prefix)
    goes before every prompt the model sees; outcomes keep the plain prompts. `generator`
    (prompts, max_new_tokens, samples, temperature) -> completions replaces the model's own
    generation (eval.vllm_engine).
    """
    generator = generator or hf_generator(model, tokenizer)
    problems = task_problems(task, "test", num_problems, EVAL_SEED)
    was_training = model.training
    model.eval()
    greedy = [c[0] for c in generator([shots + p["prompt"] for p in problems],
                                      answer_tokens(problems))]  # fmt: skip
    metrics, correct = greedy_metrics(task, problems, greedy)
    if pass_k > 1 and pass_k_problems:
        import torch

        torch.manual_seed(EVAL_SEED)  # the same samples for the same model, run after run
        sampled = problems[:pass_k_problems]
        drawn = generator(
            [shots + p["prompt"] for p in sampled], answer_tokens(problems), pass_k, temperature
        )
        metrics |= sampled_metrics(task, sampled, drawn, k_list(pass_k, k_values))
    if ood_problems:
        far = task_problems(task, "ood", ood_problems, EVAL_SEED)
        texts = [c[0] for c in generator([shots + p["prompt"] for p in far], answer_tokens(far))]
        scored, _ = greedy_metrics(task, far, texts)
        metrics |= {k.replace("task_", "task_ood_", 1): v for k, v in scored.items()}
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


def greedy_metrics(
    task: TaskBase, problems: list[dict[str, Any]], greedy: list[str]
) -> tuple[dict[str, Any], list[bool]]:
    """Metrics of greedy completions of `problems`, and whether each was right."""
    scores = [score(task, c, p["answer"], p) for c, p in zip(greedy, problems, strict=True)]
    correct = [exact == 1.0 for exact, _ in scores]
    low, high = wilson_interval(sum(correct), len(problems))
    subtasks = [p["subtask"] for p in problems]
    macro = macro_average(correct, subtasks)
    metrics: dict[str, Any] = {
        "task_accuracy": sum(correct) / len(problems),
        "task_accuracy_low": low,
        "task_accuracy_high": high,
        "task_format_rate": sum(map(task.is_bare, greedy)) / len(problems),
        "task_answer_rate": sum(task.parse(c) is not None for c in greedy) / len(problems),
        "task_partial_credit": sum(partial for _, partial in scores) / len(problems),
        "task_problems": len(problems),
    }
    for subtask, (right, total) in subtask_counts(correct, subtasks).items():
        metrics[f"task_accuracy/{subtask}"] = right / total
    metrics |= {
        "task_macro_accuracy": macro["macro"],
        "task_macro_accuracy_low": macro["low"],
        "task_macro_accuracy_high": macro["high"],
        "task_subtasks": macro["subtasks"],
        **length_metrics(task, greedy),
    }
    return metrics, correct


def task_evaluator(
    task: TaskBase, tokenizer_dir: Path, num_problems: int, generation: Any = None
) -> Callable[[Any], dict[str, float]]:
    """An in-loop evaluator: greedy accuracy (overall and per subtask), the rates of bare and of
    any leading answers, and the mean partial credit of the live model on the first
    `num_problems` held-out problems, the same ones at every validation, generated by the
    engine `generation` names (eval.vllm_engine.GenerationConfig; default hf)."""
    from transformers import AutoTokenizer

    from eval.vllm_engine import live_engine

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def evaluate(model: Any) -> dict[str, float]:
        with live_engine(generation, model, tokenizer) as generator:
            metrics = score_task(model, tokenizer, task, num_problems, generator=generator)
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


def macro_paired_tests(
    outcomes: dict[str, list[bool]], subtasks: list[str]
) -> dict[str, dict[str, float]]:
    """The paired test of macro averages (eval.macro) of each model against the one before it."""
    names = list(outcomes)
    return {
        f"{later}_vs_{earlier}": macro_paired_test(outcomes[earlier], outcomes[later], subtasks)
        for earlier, later in zip(names, names[1:], strict=False)
    }


def headline_pass_key(metrics: dict[str, Any]) -> str | None:
    """The key of the pass@k with the largest k (all samples drawn) of a model, or None."""
    found = [(int(m.group(1)), key) for key in metrics if (m := PASS_KEY.match(key))]
    return max(found)[1] if found else None


def accuracy_table(
    results: dict[str, dict[str, Any]],
    tests: dict[str, dict[str, float]],
    task: TaskBase,
    macro_tests: dict[str, dict[str, float]] | None = None,
) -> str:
    """One line per model: greedy accuracy with its 95% interval, pass@k, the paired difference
    and p-value against the model on the line above, then the same for the macro average."""
    scored = [(name, m) for name, m in results.items() if "task_accuracy" in m]
    width = max(len(name) for name, _ in scored)
    pass_key = headline_pass_key(scored[0][1])
    first = scored[0][1]
    lines = [
        f"held-out {task.FAMILY} accuracy: greedy pass@1 of {first['task_problems']} "
        f"[95% interval]{', ' + pass_key.replace('task_pass_at_', 'pass@') if pass_key else ''}"
        ", McNemar vs the line above"
        + (f"; macro over {first['task_subtasks']} subtasks [95%], sign-flip test vs the line "
           "above" if "task_macro_accuracy" in first else "")
    ]  # fmt: skip
    for index, (name, m) in enumerate(scored):
        line = (
            f"{name:<{width}}  {100 * m['task_accuracy']:5.1f}% [{100 * m['task_accuracy_low']:4.1f}, "
            f"{100 * m['task_accuracy_high']:4.1f}]"
        )
        if pass_key and pass_key in m:
            line += f"  {100 * m[pass_key]:5.1f}%"
        earlier = f"{name}_vs_{scored[index - 1][0]}" if index else ""
        if (test := tests.get(earlier)) is not None:
            line += f"  {100 * test['difference']:+5.1f} pts  p={test['p_value']:.2g}"
        if "task_macro_accuracy" in m:
            line += (
                f"  | macro {100 * m['task_macro_accuracy']:5.1f}% "
                f"[{100 * m['task_macro_accuracy_low']:4.1f}, "
                f"{100 * m['task_macro_accuracy_high']:4.1f}]"
            )
        if (test := (macro_tests or {}).get(earlier)) is not None:
            line += f"  {100 * test['difference']:+5.1f} pts  p={test['p_value']:.2g}"
        lines.append(line)
    return "\n".join(lines)
