"""Sweeps, the scaling-law fit, and the scaling and transformer-variants recipes end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from eval.scaling import FULL_FORM, PURE_FORM, fit_power_law
from pipeline.engine.config import bundled_recipes_dir, load_recipe, read_recipe, validate_recipe
from pipeline.engine.errors import RecipeError
from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, tiny_recipe, write_recipe

SIZES = [16, 24, 32, 48]
LAYERS = [1, 1, 2, 2]


def _swept(run_dir: Path) -> dict[str, Any]:
    """The helpers' tiny recipe with its pretrain stage swept over four widths."""
    data = tiny_recipe(run_dir)
    data["stages"]["pretrain"]["sweep"] = {"model.hidden_size": SIZES, "model.num_layers": LAYERS}
    del data["stages"]["eval"]
    data["stages"]["scaling"] = {"kind": "scaling", "after": ["pretrain"]}
    return data


# ---------------------------------------------------------------------------------------------
# The fit


@pytest.mark.parametrize(("a", "alpha", "c"), [(40.0, 0.35, 1.7), (8.0, 0.076, 0.5)])
def test_fit_recovers_a_known_exponent(a: float, alpha: float, c: float) -> None:
    n = np.geomspace(1e4, 1e9, 8)
    exact = fit_power_law(n, a * n**-alpha + c)
    assert exact.form == FULL_FORM
    assert exact.alpha == pytest.approx(alpha, rel=1e-4)
    assert exact.a == pytest.approx(a, rel=1e-3)
    assert exact.c == pytest.approx(c, rel=1e-3)
    noise = np.exp(np.random.default_rng(0).normal(0.0, 0.005, len(n)))  # 0.5% multiplicative
    noisy = fit_power_law(n, (a * n**-alpha + c) * noise)
    assert noisy.alpha == pytest.approx(alpha, abs=0.03)
    assert 0 < noisy.rmse_log < 0.01


def test_three_points_fall_back_to_a_pure_power_law() -> None:
    n = np.array([1e4, 1e5, 1e6])
    fit = fit_power_law(n, 5.0 * n**-0.3)
    assert fit.form == PURE_FORM and fit.c == 0.0
    assert fit.alpha == pytest.approx(0.3, rel=1e-9)
    assert fit.predict([1e7])[0] == pytest.approx(5.0 * 1e7**-0.3, rel=1e-9)


@pytest.mark.parametrize(
    ("n", "loss"), [([1e4, 1e4], [3.0, 2.0]), ([1e4, 1e5], [3.0, -1.0]), ([1e4], [3.0])]
)
def test_fit_refuses_unusable_points(n: list[float], loss: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_power_law(n, loss)


# ---------------------------------------------------------------------------------------------
# Sweep expansion


def test_sweep_expands_zipped_stages_and_downstream_waits_for_all(tmp_path: Path) -> None:
    recipe = validate_recipe(_swept(tmp_path / "runs"))
    names = [f"pretrain.hidden_size-{h}_num_layers-{n}" for h, n in zip(SIZES, LAYERS, strict=True)]
    assert list(recipe.stages) == ["tokenizer", "tokenize", *names, "scaling"]
    for name, hidden, layers in zip(names, SIZES, LAYERS, strict=True):
        stage = recipe.stages[name]
        assert (stage.model.hidden_size, stage.model.num_layers) == (hidden, layers)
        assert stage.model.num_heads == 2 and stage.max_steps == 8  # the rest is shared
        assert stage.after == ["tokenize"]
    assert recipe.stages["scaling"].after == names
    # The resolved recipe (what workers and Slurm jobs read) validates to the same stages.
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.model_dump() == recipe.model_dump()


def test_sweep_names_fall_back_to_indices_and_overrides_replace_a_list(tmp_path: Path) -> None:
    data = _swept(tmp_path / "runs")
    data["stages"]["pretrain"]["sweep"] = {"optim": [{"lr": 1e-3}, {"lr": 3e-3}]}
    recipe = validate_recipe(copy.deepcopy(data))
    assert [recipe.stages[f"pretrain.{i}"].optim.lr for i in (0, 1)] == [1e-3, 3e-3]
    data["stages"]["pretrain"]["sweep"] = {"model.hidden_size": [16, 32]}
    # `-o stages.pretrain.sweep.model.hidden_size=[8,64]` arrives nested; the later key wins.
    data["stages"]["pretrain"]["sweep"]["model"] = {"hidden_size": [8, 64]}
    recipe = validate_recipe(data)
    assert [s for s in recipe.stages if s.startswith("pretrain")] == [
        "pretrain.hidden_size-8",
        "pretrain.hidden_size-64",
    ]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"model.hidden_sise": [16]}, "stages.pretrain.sweep.model.hidden_sise: unknown key; "),
        ({"model.hidden_size": []}, "stages.pretrain.sweep.model.hidden_size: got []"),
        ({"max_steps": 5}, "stages.pretrain.sweep.max_steps: got 5; expected a non-empty list"),
        (
            {"model.hidden_size": [16, 32], "max_steps": [4, 5, 6]},
            "stages.pretrain.sweep.max_steps: 3 values but model.hidden_size has 2",
        ),
        ({"max_steps.every": [1]}, "stages.pretrain.sweep.max_steps: not a mapping"),
        ([16, 32], "stages.pretrain.sweep: expected {key: [values]}"),
    ],
)
def test_sweep_errors_are_one_line_naming_the_key_path(
    tmp_path: Path, sweep: Any, expected: str
) -> None:
    data = _swept(tmp_path / "runs")
    data["stages"]["pretrain"]["sweep"] = sweep
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    assert len(str(info.value).splitlines()) == 1
    assert expected in str(info.value)


def test_sweep_on_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    data = _swept(tmp_path / "runs")
    data["stages"]["pretrain"]["kind"] = "pretrian"
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.kind: 'pretrian' is not a stage "
                       r"kind; did you mean 'pretrain'\?"):  # fmt: skip
        validate_recipe(data)


def test_submit_plan_runs_the_sweep_points_as_parallel_jobs(tmp_path: Path) -> None:
    from pipeline.engine.slurm import submit

    recipe = validate_recipe(_swept(tmp_path / "runs"))
    plan = {s.stage: s.after for s in submit(recipe, dry_run=True)}
    points = [name for name in plan if name.startswith("pretrain.")]
    assert len(points) == len(SIZES)
    assert all(plan[name] == ("tokenize",) for name in points)  # not chained to one another
    assert plan["scaling"] == tuple(points)  # the fit waits for every size
    script = (tmp_path / "runs" / points[0] / "slurm" / "job.sbatch").read_text()
    assert points[0] in script


# ---------------------------------------------------------------------------------------------
# The bundled recipes, shrunk to seconds


def _bundled(name: str) -> dict[str, Any]:
    return read_recipe(bundled_recipes_dir() / "llm" / f"{name}.yaml")  # with extends resolved


def _shrunk(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A recipe on 300 KB of data, a 400-token vocabulary, 4 steps of 4 x 32 tokens."""
    data |= {"run_dir": str(run_dir), "tracking": {"mode": "disabled"}}
    for stage in data["stages"].values():
        if stage["kind"] in ("tokenizer", "tokenize"):
            stage["source"]["max_bytes"] = 300_000
        if stage["kind"] == "tokenizer":
            stage |= {"vocab_size": 400, "sample_bytes": 300_000}
        if stage["kind"] == "pretrain":
            stage |= {"max_steps": 4, "seq_len": 32, "micro_batch_size": 4, "log_every": 2}
            stage |= {"schedule": {"warmup_steps": 1}, "eval_every": 4, "eval_batches": 1}
        if stage["kind"] == "eval":
            stage |= {"max_tokens": 500, "max_new_tokens": 2, "prompts": ["def "]}
    return data


@pytest.mark.e2e
def test_scaling_recipe_runs_fits_and_reports(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "scaling"
    data = _shrunk(_bundled("scaling"), run_dir)
    assert len(data["stages"]["pretrain"]["sweep"]["model.hidden_size"]) >= 4
    data["stages"]["pretrain"]["sweep"] = {"model.hidden_size": SIZES, "model.num_layers": LAYERS}
    result = cli("run", str(write_recipe(tmp_path / "s.yaml", data)))
    assert result.returncode == 0, result.stdout + result.stderr
    points = sorted(p.parent.name for p in run_dir.glob("pretrain.*/stage.json"))
    assert len(points) == len(SIZES)
    vocab = json.loads((run_dir / "tokenize" / "export" / "meta.json").read_text())["vocab_size"]
    sizes = []
    for name in points:
        summary = read_manifest(run_dir / name)["summary"]
        hidden = int(name.split("hidden_size-")[1].split("_")[0])
        # llama ties its head to the embedding: the only vocabulary-sized table.
        assert summary["params"] - summary["non_embedding_params"] == vocab * hidden, name
        sizes.append(summary["non_embedding_params"])
    fit = json.loads((run_dir / "scaling" / "export" / "fit.json").read_text())
    assert sorted(row[1] for row in fit["rows"]) == sorted(sizes)
    assert [row[3] for row in fit["rows"]] == [
        read_manifest(run_dir / row[0])["summary"]["val_loss"] for row in fit["rows"]
    ]
    summary = read_manifest(run_dir / "scaling")["summary"]
    assert summary["alpha"] == fit["alpha"] and summary["num_points"] == len(SIZES)
    assert (run_dir / "scaling" / "export" / "scaling.png").stat().st_size > 1000
    page = (run_dir / "report" / "index.html").read_text()
    assert "scaling: Scaling law" in page and 'src="scaling_scaling.png"' in page


def test_variants_recipe_matches_parameter_counts_within_10_percent() -> None:
    from pipeline.models import build_model
    from pipeline.stages.pretrain import parameter_counts

    recipe = load_recipe("llm/variants")
    vocab = recipe.stages["tokenizer"].vocab_size
    counts = {}
    for stage in recipe.stages.values():
        if stage.kind == "pretrain":
            model = build_model(stage.model, vocab, stage.seq_len).model
            counts[stage.model.arch] = parameter_counts(
                model, stage.model.experts_per_token, stage.model.num_experts
            )
    assert set(counts) == {"bert", "llama", "t5", "mixtral"}
    sizes = [c["non_embedding_params"] for c in counts.values()]
    assert max(sizes) / min(sizes) < 1.1, counts
    moe = counts["mixtral"]  # matched on total parameters; a token uses 2 of 4 experts
    assert moe["active_non_embedding_params"] < 0.7 * moe["non_embedding_params"]
    assert all(c["non_embedding_params"] == c["active_non_embedding_params"]
               for arch, c in counts.items() if arch != "mixtral")  # fmt: skip


@pytest.mark.e2e
def test_variants_recipe_compares_four_families(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "variants"
    data = _shrunk(_bundled("variants"), run_dir)
    for stage in data["stages"].values():  # narrower models, the same four families
        if stage["kind"] == "pretrain":
            stage["model"] = {**stage["model"], "hidden_size": 32}
    result = cli("run", str(write_recipe(tmp_path / "v.yaml", data)))
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads((run_dir / "compare" / "export" / "comparison.json").read_text())
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["rows"]}
    assert set(rows) == {"bert", "llama", "t5", "mixtral"}
    assert rows["bert"]["loss is"].startswith("masked LM")
    assert rows["t5"]["loss is"].startswith("span corruption")
    assert rows["mixtral"]["loss is"].startswith("causal LM: next-token CE + 0.01")
    assert len({row["tokens"] for row in rows.values()}) == 1  # the same tokens for all
    for name, row in rows.items():
        summary = read_manifest(run_dir / name)["summary"]
        assert row["val_loss"] == summary["val_loss"] and row["params"] == summary["params"]
        assert row["train/tokens_per_second"] > 0 and row["duration_s"] > 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "compare: Transformer variants at matched parameters" in page
    assert 'src="compare_train_loss.png"' in page
