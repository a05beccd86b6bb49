"""lm-evaluation-harness on our exports: shipped task YAMLs over generated local JSONL, or any
installed lm-eval task by name (those may need a network for their datasets).

The shipped tasks (eval/tasks/*.yaml) read JSONL written here from the held-out split of the
eval stage's verifiable task (data_prep.tasks);
the model is the export directory, loaded by lm-eval's own `hf` model class, so nothing is
downloaded.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from data_prep.tasks import Key, TaskBase, problem_keys
from pipeline.engine.errors import PipelineError
from pipeline.engine.schema_errors import suggest

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED = {path.stem: path for path in sorted(TASKS_DIR.glob("*.yaml"))}


@cache
def task_manager() -> Any:
    """lm-eval's index of its installed tasks, built once per process (it reads every task file
    lm-eval ships, ~15,000, which takes seconds): the plan checks names with the index the run
    evaluates with."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_names_problem(names: list[str], field: str) -> str | None:
    """Why one of `names` is no lm-eval task here (neither shipped nor installed), or None; the
    index is only built for a name that is not shipped."""
    others = [name for name in names if name not in SHIPPED]
    known = task_manager().all_tasks if others else []
    for name in others:
        if name not in known:
            return (
                f"{field}: unknown lm-eval task {name!r}{suggest(name, [*SHIPPED, *known])}; use "
                f"{', '.join(SHIPPED)} or an installed lm-eval task"
            )
    return None


def write_task_data(name: str, task: TaskBase, out_dir: Path, num: int, seed: int = 0) -> Path:
    """The JSONL of a shipped task: held-out problems (with four choices for task_choice)."""
    rng = random.Random(seed)
    rows = []
    for key in problem_keys(task, "test", num, seed):
        answer = task.answer(key)
        row = {"prompt": task.prompt(key), "answer": answer}
        if name == "task_choice":
            choices = [answer, *distractors(task, key, rng)]
            rng.shuffle(choices)
            row |= {"choices": [f" {c}" for c in choices], "label": choices.index(answer)}
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def distractors(task: TaskBase, key: Key, rng: random.Random, count: int = 3) -> list[str]:
    """`count` distinct wrong answers: the task's near misses, else the answer with a digit added."""
    answer = task.answer(key)
    wrong: dict[str, None] = {}
    for _ in range(20 * count):
        wrong[task.near_miss(key, rng)] = None
        if len(wrong) == count:
            return list(wrong)
    extra = (answer + digit for digit in "0123456789")
    while len(wrong) < count:
        wrong[next(extra)] = None
    return list(wrong)


def task_specs(
    names: list[str], task: TaskBase, data_dir: Path, num: int
) -> list[str | dict[str, Any]]:
    """lm-eval task specs: shipped names become configs over fresh JSONL, others pass through."""
    specs: list[str | dict[str, Any]] = []
    for name in names:
        if name in SHIPPED:
            config = yaml.safe_load(SHIPPED[name].read_text(encoding="utf-8"))
            data = write_task_data(name, task, data_dir, num)
            config["dataset_kwargs"] = {"data_files": {"test": str(data)}}
            specs.append(config)
        else:
            specs.append(name)
    return specs


def run_harness(
    model_dir: Path,
    names: list[str],
    data_dir: Path,
    num: int,
    task: TaskBase,
    batch_size: int = 16,
) -> dict[str, float]:
    """Run lm-eval on an HF export; returns flat `task/metric` -> value (filters dropped)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = {"pretrained": str(model_dir), "dtype": "float32", "device": device}
    return _evaluate("hf", model_args, names, data_dir, num, task, batch_size)


def lm_eval_evaluator(
    names: list[str], task: TaskBase, tokenizer_dir: Path, data_dir: Path, num: int
) -> Any:
    """An in-loop evaluator: lm-eval's tasks on the live model (wrapped in lm-eval's HFLM, no
    export), the same first `num` examples at every validation; metrics as lm_eval/task/metric."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def evaluate(model: Any) -> dict[str, float]:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
        flat = _evaluate(lm, {}, names, data_dir, num, task, 16)
        return {f"lm_eval/{key}": value for key, value in flat.items()}

    return evaluate


def _evaluate(
    model: Any,
    model_args: dict[str, Any],
    names: list[str],
    data_dir: Path,
    num: int,
    task: TaskBase,
    batch_size: int,
) -> dict[str, float]:
    """simple_evaluate on `model` (a registered name with model_args, or an LM instance)."""
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(
            model=model,
            model_args=model_args or None,
            tasks=task_specs(names, task, data_dir, num),
            task_manager=task_manager(),
            limit=num,
            batch_size=batch_size,
            log_samples=False,
        )
    except KeyError as exc:
        raise PipelineError(
            f"eval lm_eval_tasks: unknown task {exc}; use {', '.join(SHIPPED)} or an installed lm-eval task"
        ) from None
    flat: dict[str, float] = {}
    for name, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if (
                isinstance(value, int | float)
                and not metric.endswith("_stderr")
                and metric != "alias"
            ):
                flat[f"{name}/{metric}"] = float(value)
    return flat
