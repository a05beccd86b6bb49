"""The per-problem outcomes of an eval stage's task scoring: paired tests between its models,
task_outcomes.jsonl and the report's accuracy chart."""

from __future__ import annotations

import json
from typing import Any

from data_prep.tasks import TaskBase
from pipeline.engine.context import StageContext
from pipeline.engine.manifest import atomic_write_text


def task_report(
    ctx: StageContext,
    task: TaskBase,
    results: dict[str, dict[str, Any]],
    outcomes: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, float]]:
    """Paired tests between consecutive models, the per-problem outcomes file and the report's
    accuracy chart; returns the tests."""
    if not outcomes:
        return {}
    from eval.report import write_sections
    from eval.task_plots import accuracy_section
    from eval.tasks import paired_tests

    tests = paired_tests({name: [o["correct"] for o in rows] for name, rows in outcomes.items()})
    first = next(iter(outcomes.values()))
    rows = [
        {**{k: problem[k] for k in ("prompt", "answer", "subtask")},
         **{name: {"completion": o[i]["completion"], "correct": o[i]["correct"]}
            for name, o in outcomes.items()}}
        for i, problem in enumerate(first)
    ]  # fmt: skip
    atomic_write_text(
        ctx.export_dir / "task_outcomes.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    write_sections(ctx.export_dir, [accuracy_section(ctx.export_dir, task, results, tests)])
    return tests
