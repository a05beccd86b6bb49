"""The per-problem outcomes of an eval stage's task scoring: paired tests between its models
(micro and macro averages), task_outcomes.jsonl and the report's accuracy sections."""

from __future__ import annotations

import json
from typing import Any

from data_prep.tasks import TaskBase
from pipeline.engine.context import StageContext
from pipeline.engine.manifest import atomic_write_text

Tests = dict[str, dict[str, float]]


def task_report(
    ctx: StageContext,
    task: TaskBase,
    results: dict[str, dict[str, Any]],
    outcomes: dict[str, list[dict[str, Any]]],
) -> tuple[Tests, Tests]:
    """Paired tests between consecutive models, the per-problem outcomes file and the report's
    accuracy sections; returns the tests of the micro and of the macro averages."""
    if not outcomes:
        return {}, {}
    from eval.accuracy_plots import accuracy_section, compute_section, lengths_section
    from eval.tasks import macro_paired_tests, paired_tests
    from pipeline.engine.sections import write_sections

    correct = {name: [o["correct"] for o in rows] for name, rows in outcomes.items()}
    first = next(iter(outcomes.values()))
    tests = paired_tests(correct)
    macro_tests = macro_paired_tests(correct, [o["subtask"] for o in first])
    rows = [
        {**{k: problem[k] for k in ("prompt", "answer", "subtask")},
         **{name: {"completion": o[i]["completion"], "correct": o[i]["correct"]}
            for name, o in outcomes.items()}}
        for i, problem in enumerate(first)
    ]  # fmt: skip
    atomic_write_text(
        ctx.export_dir / "task_outcomes.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    sections = [
        accuracy_section(ctx.export_dir, task, results, tests, macro_tests),
        compute_section(ctx.export_dir, results),
        lengths_section(results),
    ]
    write_sections(ctx.export_dir, [s for s in sections if s is not None])
    return tests, macro_tests
