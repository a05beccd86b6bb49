"""Report sections for verifiable tasks: accuracy per model with intervals, and RL curves.

Each function draws a PNG into a stage's export dir and returns a section for
`eval.report.write_sections`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.tasks import TaskBase


def accuracy_section(
    export_dir: Path,
    task: TaskBase,
    results: dict[str, dict[str, Any]],
    tests: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """A bar per model (greedy pass@1 with its 95% Wilson interval) and the table behind it."""
    from matplotlib.figure import Figure

    scored = {name: m for name, m in results.items() if "task_accuracy" in m}
    names = list(scored)
    accuracy = [100 * scored[n]["task_accuracy"] for n in names]
    # Interval half-widths below and above each bar (clipped: rounding must not make them < 0).
    low = [
        max(0.0, a - 100 * scored[n]["task_accuracy_low"])
        for a, n in zip(accuracy, names, strict=True)
    ]
    high = [
        max(0.0, 100 * scored[n]["task_accuracy_high"] - a)
        for a, n in zip(accuracy, names, strict=True)
    ]
    figure = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    axes.bar(names, accuracy, yerr=[low, high], capsize=6, color="#4c78a8")
    for x, value in enumerate(accuracy):
        axes.text(x, value + max(high) + 1, f"{value:.1f}%", ha="center")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_ylim(0, min(100, max(a + h for a, h in zip(accuracy, high, strict=True)) + 10))
    axes.set_title(f"{task.FAMILY}: greedy pass@1 on {scored[names[0]]['task_problems']} problems")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(export_dir / "task_accuracy.png", format="png")
    pass_key = next((k for k in scored[names[0]] if k.startswith("task_pass_at_")), None)
    columns = ["model", "pass@1", "95% low", "95% high", "format rate"]
    columns += [pass_key.replace("task_pass_at_", "pass@")] if pass_key else []
    columns += ["vs previous", "gained", "lost", "p (McNemar)"]
    rows = []
    for index, name in enumerate(names):
        m = scored[name]
        row = [name, m["task_accuracy"], m["task_accuracy_low"], m["task_accuracy_high"]]
        row += [m["task_format_rate"]] + ([m.get(pass_key)] if pass_key else [])
        test = tests.get(f"{name}_vs_{names[index - 1]}") if index else None
        row += [test["difference"], test["gained"], test["lost"], test["p_value"]] if test else [
            "-", "-", "-", "-"
        ]  # fmt: skip
        rows.append(row)
    subtasks = sorted({k for m in scored.values() for k in m if k.startswith("task_accuracy/")})
    return {
        "title": f"held-out {task.FAMILY} accuracy",
        "note": f"Task {task.model_dump()}. Greedy exact match on the same held-out problems for "
        "every model, 95% Wilson intervals; the paired test is exact McNemar against the model "
        "before it; pass@k samples k answers at temperature 1. Per subtask: "
        + ", ".join(
            f"{s.split('/', 1)[1]}: " + " / ".join(f"{scored[n].get(s, 0):.0%}" for n in names)
            for s in subtasks
        ),
        "columns": columns,
        "rows": rows,
        "images": ["task_accuracy.png"],
    }


def rl_section(export_dir: Path, rows: list[dict[str, Any]], algorithm: str) -> dict[str, Any]:
    """Reward mean (with its std band) and held-out accuracy against RL steps."""
    from matplotlib.figure import Figure

    reward = [(r["step"], r["train/reward"], r.get("train/reward_std", 0.0)) for r in rows
              if "train/reward" in r]  # fmt: skip
    accuracy = [
        (r["step"], 100 * r["eval/task_accuracy"]) for r in rows if "eval/task_accuracy" in r
    ]
    figure = Figure(figsize=(7, 3.5), dpi=100, layout="constrained")
    left = figure.subplots()
    if reward:
        steps, means, stds = zip(*reward, strict=True)
        left.plot(steps, means, "-", color="#4c78a8", label="reward mean")
        left.fill_between(
            steps, [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)], color="#4c78a8", alpha=0.15,
        )  # fmt: skip
    left.set_xlabel(f"{algorithm} step")
    left.set_ylabel("reward", color="#4c78a8")
    right = left.twinx()
    if accuracy:
        steps, values = zip(*accuracy, strict=True)
        right.plot(steps, values, "o-", color="#e45756", label="held-out accuracy")
    right.set_ylabel("held-out accuracy (%)", color="#e45756")
    left.grid(alpha=0.3)
    left.set_title(f"{algorithm}: reward and held-out accuracy")
    figure.savefig(export_dir / "rl_curves.png", format="png")
    zero = [r["train/frac_reward_zero_std"] for r in rows if "train/frac_reward_zero_std" in r]
    return {
        "title": f"{algorithm} learning curves",
        "note": "Reward mean of the sampled groups (band: reward std) and greedy accuracy on "
        "held-out problems every eval_every steps. "
        + (
            f"Groups with zero reward variance: {zero[0]:.0%} at the start, {zero[-1]:.0%} at the end."
            if zero
            else ""
        ),  # fmt: skip
        "columns": ["step", "held-out accuracy"],
        "rows": [[step, value / 100] for step, value in accuracy],
        "images": ["rl_curves.png"],
    }
