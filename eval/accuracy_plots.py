"""Report sections of an eval stage's task scoring: accuracy per model (micro and macro
averages with intervals), accuracy against samples k (maj@k, pass@k), answer lengths and
out-of-distribution accuracy.

Each section function draws its PNGs into the export directory and returns a section in the
form of `pipeline.engine.sections.write_sections`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.tasks import TaskBase
from eval.tasks import headline_pass_key
from eval.test_time import MAJ_KEY, PASS_KEY, k_curve

K_COLUMNS = ["model", "k", "maj@k", "maj 95% low", "maj 95% high", "pass@k", "pass 95% low",
             "pass 95% high"]  # fmt: skip
LENGTH_KEYS = ["task_completion_chars", "task_thinking_chars", "task_ood_accuracy",
               "task_ood_accuracy_low", "task_ood_accuracy_high", "task_ood_macro_accuracy"]  # fmt: skip


def accuracy_section(
    export_dir: Path,
    task: TaskBase,
    results: dict[str, dict[str, Any]],
    tests: dict[str, dict[str, float]],
    macro_tests: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Two bars per model (greedy pass@1 over all problems, and its macro average over subtasks,
    each with its 95% interval) and the table behind them."""
    scored = {name: m for name, m in results.items() if "task_accuracy" in m}
    names = list(scored)
    plot_accuracy(export_dir / "task_accuracy.png", task, scored)
    pass_key = headline_pass_key(scored[names[0]])
    macro = "task_macro_accuracy" in scored[names[0]]
    columns = ["model", "pass@1", "95% low", "95% high", "format rate"]
    columns += [pass_key.replace("task_pass_at_", "pass@")] if pass_key else []
    columns += ["vs previous", "gained", "lost", "p (McNemar)"]
    columns += ["macro", "macro 95% low", "macro 95% high", "macro vs previous",
                "p (sign-flip)"] if macro else []  # fmt: skip
    rows = []
    for index, name in enumerate(names):
        m = scored[name]
        row = [name, m["task_accuracy"], m["task_accuracy_low"], m["task_accuracy_high"]]
        row += [m["task_format_rate"]] + ([m.get(pass_key)] if pass_key else [])
        earlier = f"{name}_vs_{names[index - 1]}" if index else ""
        test = tests.get(earlier)
        row += [test["difference"], test["gained"], test["lost"], test["p_value"]] if test else [
            "-", "-", "-", "-"
        ]  # fmt: skip
        if macro:
            row += [m["task_macro_accuracy"], m["task_macro_accuracy_low"],
                    m["task_macro_accuracy_high"]]  # fmt: skip
            test = (macro_tests or {}).get(earlier)
            row += [test["difference"], test["p_value"]] if test else ["-", "-"]
        rows.append(row)
    subtasks = sorted({k for m in scored.values() for k in m if k.startswith("task_accuracy/")})
    return {
        "title": f"held-out {task.FAMILY} accuracy",
        "note": f"Task {task.model_dump()}. Greedy exact match on the same held-out problems for "
        "every model, 95% Wilson intervals; the paired test is exact McNemar against the model "
        "before it; pass@k samples k answers at temperature 1. The macro average weighs every "
        "subtask the same (Price-Bonett interval; its paired test is a stratified sign-flip "
        "test, see eval.macro). Per subtask: "
        + ", ".join(
            f"{s.split('/', 1)[1]}: " + " / ".join(f"{scored[n].get(s, 0):.0%}" for n in names)
            for s in subtasks
        ),
        "columns": columns,
        "rows": rows,
        "images": ["task_accuracy.png"],
    }


def plot_accuracy(path: Path, task: TaskBase, scored: dict[str, dict[str, Any]]) -> None:
    """Save a bar per model and average (micro: all problems; macro: mean over subtasks) with
    its 95% interval."""
    from matplotlib.figure import Figure

    names = list(scored)
    averages = [("task_accuracy", "micro (all problems)", "#4c78a8")]
    if all("task_macro_accuracy" in m for m in scored.values()):
        averages.append(("task_macro_accuracy", "macro (mean over subtasks)", "#f58518"))
    width = 0.8 / len(averages)
    figure = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    top = 0.0
    for slot, (key, label, color) in enumerate(averages):
        values = [100 * scored[n][key] for n in names]
        # Interval half-widths below and above each bar (clipped: rounding must not make them < 0).
        low = [
            max(0.0, v - 100 * scored[n][f"{key}_low"]) for v, n in zip(values, names, strict=True)
        ]
        high = [
            max(0.0, 100 * scored[n][f"{key}_high"] - v) for v, n in zip(values, names, strict=True)
        ]
        xs = [x + (slot - (len(averages) - 1) / 2) * width for x in range(len(names))]
        axes.bar(xs, values, width, yerr=[low, high], capsize=4, color=color, label=label)
        for x, value, up in zip(xs, values, high, strict=True):
            axes.text(x, value + up + 1, f"{value:.1f}%", ha="center", fontsize="small")
        top = max(top, *(v + h for v, h in zip(values, high, strict=True)))
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_ylim(0, top + 10)
    axes.set_title(f"{task.FAMILY}: greedy pass@1 on {scored[names[0]]['task_problems']} problems")
    axes.grid(axis="y", alpha=0.3)
    if len(averages) > 1:
        figure.legend(fontsize="small", loc="outside lower center", ncols=2)
    figure.savefig(path, format="png")


def compute_section(export_dir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """maj@k and pass@k against k per model (one plot, and the table behind it), or None when no
    model was sampled."""
    from matplotlib.figure import Figure

    curves = {
        name: (k_curve(m, MAJ_KEY), k_curve(m, PASS_KEY))
        for name, m in results.items()
        if k_curve(m, MAJ_KEY)
    }
    if not curves:
        return None
    figure = Figure(figsize=(6.5, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    rows = []
    for index, (name, (majority, passing)) in enumerate(curves.items()):
        color = f"C{index}"
        for curve, style, label in ((majority, "o-", "maj@k"), (passing, "s--", "pass@k")):
            ks, values = zip(*curve, strict=True)
            axes.plot(ks, [100 * v for v in values], style, color=color, label=f"{name} {label}")
        axes.axhline(100 * results[name]["task_accuracy"], color=color, ls=":", lw=1)
        m = results[name]
        rows += [
            [name, k, m[f"task_maj_at_{k}"], m[f"task_maj_at_{k}_low"], m[f"task_maj_at_{k}_high"],
             m[f"task_pass_at_{k}"], m[f"task_pass_at_{k}_low"], m[f"task_pass_at_{k}_high"]]
            for k, _ in majority
        ]  # fmt: skip
    axes.set_xscale("log", base=2)
    ks = sorted({k for majority, _ in curves.values() for k, _ in majority})
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("samples k (temperature 1)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title("maj@k (solid), pass@k (dashed), greedy (dotted)")
    axes.grid(alpha=0.3)
    figure.legend(fontsize="small", loc="outside right center")
    figure.savefig(export_dir / "task_accuracy_k.png", format="png")
    return {
        "title": "accuracy against samples k (test-time compute)",
        "note": "maj@k: the answer most of the first k samples give (ties: the one given first; "
        "samples without an answer do not vote), graded; pass@k: Chen et al.'s unbiased estimate "
        "that one of k samples is right, from all samples drawn; both on the first "
        "pass_k_problems held-out problems, with 95% Wilson intervals over problems "
        "(conservative for pass@k). Dotted: greedy accuracy on all held-out problems.",
        "columns": K_COLUMNS,
        "rows": rows,
        "images": ["task_accuracy_k.png"],
    }


def lengths_section(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean completion and thinking lengths and out-of-distribution accuracy per model."""
    scored = {name: m for name, m in results.items() if "task_accuracy" in m}
    shown = [k for k in LENGTH_KEYS if any(k in m for m in scored.values())]
    first = next(iter(scored.values()))
    return {
        "title": "answer lengths and out-of-distribution accuracy",
        "note": "Means over the greedy completions of the held-out problems, in characters; "
        "thinking: inside <think>...</think> (to the end when unclosed). "
        + (
            f"Out of distribution: greedy accuracy on {first['task_ood_problems']} problems "
            "outside the task's space (longer operands, more numbers), 95% Wilson interval."
            if "task_ood_problems" in first
            else ""
        ),
        "columns": ["model", *(k.removeprefix("task_") for k in shown)],
        "rows": [[name, *(m.get(k) for k in shown)] for name, m in scored.items()],
    }
