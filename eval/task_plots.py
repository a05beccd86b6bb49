"""Report sections for verifiable tasks' training: RL curves and the over-optimisation picture
of guarded RL runs (eval.accuracy_plots has the eval stage's accuracy sections).

Each section function draws PNGs into a directory and returns a section in the form of
`pipeline.engine.sections.write_sections`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.manifest import StageRecord
from pipeline.engine.tracking import read_metrics

RL_CURVES_PNG = "rl_curves.png"


def rl_section(export_dir: Path, rows: list[dict[str, Any]], algorithm: str) -> dict[str, Any]:
    """Reward mean (with its std band) and held-out accuracy against RL steps."""
    plot_rl_curves(rows, export_dir / RL_CURVES_PNG, algorithm)
    evals = [r for r in rows if "eval/task_accuracy" in r]
    thinking = any("eval/task_thinking_chars" in r for r in evals)  # a cot task: R1's curves
    zero = [r["train/frac_reward_zero_std"] for r in rows if "train/frac_reward_zero_std" in r]
    return {
        "title": f"{algorithm} learning curves",
        "note": "Reward mean of the sampled groups (band: reward std) and greedy accuracy on "
        "held-out problems every eval_every steps"
        + (", with the mean thinking length (characters inside <think>)" if thinking else "")
        + ". "
        + (
            f"Groups with zero reward variance: {zero[0]:.0%} at the start, {zero[-1]:.0%} at the end."
            if zero
            else ""
        ),  # fmt: skip
        "columns": ["step", "held-out accuracy"] + (["thinking chars"] if thinking else []),
        "rows": [
            [r["step"], r["eval/task_accuracy"]]
            + ([round(r.get("eval/task_thinking_chars", 0.0), 1)] if thinking else [])
            for r in evals
        ],
        "images": [RL_CURVES_PNG],
    }


def plot_rl_curves(rows: list[dict[str, Any]], path: Path, algorithm: str) -> None:
    """Save reward mean (std band) and held-out accuracy against RL steps: the RL picture the
    report shows in place of a policy-gradient loss, which hovers around 0 whatever happens."""
    from matplotlib.figure import Figure

    reward = [(r["step"], r["train/reward"], r.get("train/reward_std", 0.0)) for r in rows
              if "train/reward" in r]  # fmt: skip
    accuracy = [
        (r["step"], 100 * r["eval/task_accuracy"]) for r in rows if "eval/task_accuracy" in r
    ]
    thinking = [
        (r["step"], r["eval/task_thinking_chars"]) for r in rows if "eval/task_thinking_chars" in r
    ]
    figure = Figure(figsize=(11 if thinking else 7, 3.5), dpi=100, layout="constrained")
    if thinking:  # R1's second picture: how long the policy thinks as RL goes on
        left, length = figure.subplots(1, 2, width_ratios=[3, 2])
        length.plot(*zip(*thinking, strict=True), "o-", color="#54a24b")
        length.set_xlabel(f"{algorithm} step")
        length.set_ylabel("thinking length (chars)")
        length.set_title("mean thinking length, held-out greedy")
        length.grid(alpha=0.3)
    else:
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
    figure.savefig(path, format="png")


@dataclass(frozen=True)
class GuardRun:
    """The guard measurements of one RL stage, for the over-optimisation picture."""

    name: str
    proxy: str  # what the policy was optimised against, in words
    steps: list[int]
    gold: list[float]
    sqrt_kl: list[float | None]
    proxies: list[float | None]
    selected_step: int  # the exported checkpoint (the best so far while the stage runs)

    @classmethod
    def from_rows(
        cls, name: str, proxy: str, rows: list[dict[str, Any]], selected_step: int | None
    ) -> GuardRun | None:
        """From metrics.jsonl rows (`guard/*` keys of pipeline.stages.rl_guard); None without."""
        guarded = [r for r in rows if "guard/gold" in r]
        if not guarded:
            return None
        gold = [r["guard/gold"] for r in guarded]
        if selected_step is None:  # no summary yet: the guard's rule, the first best gold
            selected_step = guarded[gold.index(max(gold))]["step"]
        return cls(
            name, proxy, [r["step"] for r in guarded], gold,
            [r.get("guard/sqrt_kl") for r in guarded], [r.get("guard/proxy") for r in guarded],
            selected_step,
        )  # fmt: skip

    def fit(self) -> tuple[float, float] | None:
        """Gao et al.'s RL form R(d) = d (alpha - beta log d) fitted by least squares to gold
        gained since step 0 (so R(0) = 0, as they fit); None with under two distinct d > 0."""
        import numpy as np

        points = [
            (d, g - self.gold[0])
            for d, g in zip(self.sqrt_kl, self.gold, strict=True)
            if d is not None and d > 0
        ]
        if self.steps[0] != 0 or len({d for d, _ in points}) < 2:
            return None
        d, gain = np.array(points).T
        (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * np.log(d)], 1), gain, rcond=None)
        return float(alpha), float(beta)

    def row(self) -> list[Any]:
        """Its row of the comparison table."""
        at = self.steps.index(self.selected_step) if self.selected_step in self.steps else None
        fit = self.fit()
        peak = math.exp(fit[0] / fit[1] - 1) if fit and fit[1] > 0 else None
        return [
            self.name, self.proxy, self.selected_step,
            self.gold[at] if at is not None else None,
            self.sqrt_kl[at] ** 2 if at is not None and self.sqrt_kl[at] is not None else None,
            self.steps[-1], self.gold[-1],
            self.gold[-1] - self.gold[at] if at is not None else None,
            *(fit or (None, None)), peak,
        ]  # fmt: skip


def guard_runs(
    run_dir: Path,
    names: list[str],
    recipe_stages: dict[str, Any],
    manifests: dict[str, StageRecord],
) -> list[GuardRun]:
    """The guard measurements of every stage of a run directory that has them, in `names` order."""
    runs = []
    for name in names:
        run = GuardRun.from_rows(
            name,
            proxy_label(recipe_stages.get(name) or {}),
            read_metrics(run_dir / name),
            manifests[name].summary.get("guard_best_step"),
        )
        if run is not None:
            runs.append(run)
    return runs


def proxy_label(stage: dict[str, Any]) -> str:
    """What an RL stage optimised, in words, from its recipe entry: its reward models (and how
    an ensemble combines them) and reward functions."""
    models = [
        m if isinstance(m, str) else m.get("path", "?") for m in stage.get("reward_model") or []
    ]
    parts = list(stage.get("rewards") or [])
    if len(models) == 1:
        parts.insert(0, f"reward model {models[0]}")
    elif models:
        ensemble = stage.get("ensemble", "mean")
        if ensemble == "mean_minus_std":
            ensemble = f"mean - {stage.get('ensemble_lambda', 1.0)} x std"
        parts.insert(0, f"ensemble ({ensemble}) of {', '.join(models)}")
    return " + ".join(parts)


OVEROPTIMISATION_COLUMNS = [
    "stage", "optimised against", "exported step", "gold there", "KL there (nats)",
    "last step", "final gold", "final - best gold", "fit alpha", "fit beta", "fit peak d",
]  # fmt: skip


def overoptimisation_section(out_dir: Path, runs: list[GuardRun]) -> dict[str, Any]:
    """Proxy reward and gold against d = sqrt(KL to the start), the fit, the exported checkpoint
    (one PNG per stage), and one table comparing the stages: does gold turn down as the proxy
    climbs, and how far from the start did the guard stop?"""
    images = []
    for run in runs:
        if any(d is not None for d in run.sqrt_kl):
            images.append(f"overoptimisation_{run.name}.png")
            plot_overoptimisation(run, out_dir / images[-1])
    return {
        "title": "reward over-optimisation",
        "note": "Gold is greedy accuracy on held-apart task problems the policy never trains on, "
        "measured by the guard with KL(policy || start) in nats per completion; d = sqrt(KL), as "
        "in Gao, Schulman and Hilton (2022), whose RL form R(d) = d (alpha - beta log d) is fitted "
        "by least squares to gold minus its value at step 0 (dashed; it peaks at d = "
        "exp(alpha / beta - 1) when beta > 0). The proxy is the reward the policy maximises (the "
        "trainer's mean reward before each measurement). The exported checkpoint is the guard's "
        "best by gold (while a stage runs: the best so far).",
        "columns": OVEROPTIMISATION_COLUMNS,
        "rows": [run.row() for run in runs],
        "images": images,
    }


def plot_overoptimisation(run: GuardRun, path: Path) -> None:
    """Save gold (left, with its fit) and proxy (right) against d = sqrt(KL to the start)."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.4), dpi=100, layout="constrained")
    left = figure.subplots()
    points = [(d, 100 * g) for d, g in zip(run.sqrt_kl, run.gold, strict=True) if d is not None]
    d, gold = zip(*points, strict=True)
    left.plot(d, gold, "o-", color="#e45756", label="gold (held-apart accuracy)")
    fit = run.fit()
    if fit is not None and fit[1] <= 0:  # no peak: not the over-optimisation shape, not drawn
        left.plot([], [], " ", label=f"fit: alpha {fit[0]:.3g}, beta {fit[1]:.3g} (no peak)")
    elif fit is not None:
        grid = np.linspace(1e-6, max(d) * 1.05, 200)
        fitted = 100 * (run.gold[0] + grid * (fit[0] - fit[1] * np.log(grid)))
        left.plot(grid, fitted, "--", color="#e45756", alpha=0.7,
                  label=f"fit: alpha {fit[0]:.3g}, beta {fit[1]:.3g}")  # fmt: skip
    if run.selected_step in run.steps:
        at = run.steps.index(run.selected_step)
        if run.sqrt_kl[at] is not None:
            left.plot(run.sqrt_kl[at], 100 * run.gold[at], "*", markersize=16, color="#222",
                      label=f"exported (step {run.selected_step})")  # fmt: skip
    left.set_xlabel("d = sqrt(KL(policy || start)), sqrt(nats)")
    left.set_ylabel("gold accuracy (%)", color="#e45756")
    proxy = [(x, p) for x, p in zip(run.sqrt_kl, run.proxies, strict=True) if None not in (x, p)]
    right = left.twinx()
    if proxy:
        right.plot(*zip(*proxy, strict=True), "s-", color="#4c78a8", label="proxy reward")
    right.set_ylabel("proxy reward", color="#4c78a8")
    handles = [h for axes in (left, right) for h in axes.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, fontsize="small", loc="outside lower center", ncols=2)
    left.grid(alpha=0.3)
    left.set_title(f"{run.name}: gold and proxy against distance from the start")
    figure.savefig(path, format="png")
