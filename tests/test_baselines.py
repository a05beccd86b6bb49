"""Baseline stage end to end: every bundled baseline recipe, shrunk, runs in one `pipeline run`;
its tables agree with scikit-learn's metrics on the exported predictions; the report shows
every comparison table and figure; a killed stage resumes without redoing finished models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn import metrics as skm

from pipeline.baselines.data import load_dataset, subsample_rows
from pipeline.engine.config import bundled_recipes_dir
from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, kill_then_resume, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

# stage -> overrides that keep every model of the bundled recipe but shrink data and budgets
SHRINK: dict[str, dict[str, Any]] = {
    "diabetes": {"cv_folds": 2},
    "breast_cancer": {"cv_folds": 3},
    "wine": {"cv_folds": 0},
    "digits": {"cv_folds": 0, "max_rows": 400},
    "clustering": {},
    "embedding": {"max_rows": 200},
    "curves": {"cv_folds": 3},
    "vision": {"options": {"epochs": 3}},
    "sequence": {
        "options": {"steps": 20, "eval_every": 10, "max_bytes": 60000, "eval_windows": 32}
    },
}
CLASSIFIERS = ("breast_cancer", "wine", "digits", "vision")


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if nested else value
    return out


def bundled_baselines(run_dir: Path) -> dict[str, Any]:
    """Every stage of every bundled baseline recipe in one recipe, shrunk by SHRINK."""
    stages: dict[str, Any] = {}
    paths = sorted((bundled_recipes_dir() / "baselines").glob("*.yaml"))
    for path in paths:
        recipe = yaml.safe_load(path.read_text())
        for name, stage in recipe["stages"].items():
            if stage["kind"] != "baseline" or stage.get("after"):
                continue  # a stage fed by other stages (generative) is tested in its own file
            assert name not in stages, f"stage name {name} repeats across baseline recipes"
            stages[name] = merged(stage, SHRINK[name])  # a new bundled stage needs an entry
    stages["report"] = {"kind": "report", "after": list(stages)}
    tracking = {"mode": "disabled"}
    return {"name": "baselines", "run_dir": str(run_dir), "tracking": tracking, "stages": stages}


def csv_twin(stage: dict[str, Any], path: Path) -> dict[str, Any]:
    """The breast-cancer stage's logistic regression on the same rows read from a CSV file."""
    data = load_dataset("builtin:breast-cancer", classes=True)
    header = ",".join([*(f"f{i}" for i in range(data.features.shape[1])), "diagnosis"])
    pairs = zip(data.features.tolist(), data.target.tolist(), strict=True)
    rows = [",".join([*map(repr, x), str(y)]) for x, y in pairs]
    path.write_text("\n".join([header, *rows]) + "\n")
    models = {"logistic_regression": stage["models"]["logistic_regression"]}
    return {**stage, "dataset": str(path), "target": "diagnosis", "models": models}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("baselines")
    run_dir = tmp_path / "runs" / "baselines"
    data = bundled_baselines(run_dir)
    data["stages"]["csv"] = csv_twin(data["stages"]["breast_cancer"], tmp_path / "cancer.csv")
    data["stages"]["report"]["after"].append("csv")  # a report comes after every table
    recipe = write_recipe(tmp_path / "baselines.yaml", data)
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def results(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "export" / "results.json").read_text())


def metrics_of(run_dir: Path, stage: str) -> dict[str, dict[str, Any]]:
    return {name: r["metrics"] for name, r in results(run_dir, stage)["models"].items()}


def predictions(run_dir: Path, stage: str, model: str) -> dict[str, np.ndarray]:
    with np.load(run_dir / stage / "export" / "predictions" / f"{model}.npz") as data:
        return {key: data[key] for key in data.files}


def test_every_recipe_reports_its_comparison_table_and_figures(run_dir: Path) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    page = (run_dir / "report" / "index.html").read_text()
    for stage in SHRINK:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "done", stage
        table = results(run_dir, stage)
        assert [row[0] for row in table["rows"]] == list(recipe["stages"][stage]["models"])
        task = recipe["stages"][stage]["task"]
        assert f"{stage}: {task} baselines on" in page
        best = table["best"]
        assert manifest["headline"] == f"best_{table['primary']}"
        assert manifest["summary"][manifest["headline"]] == best["value"]
        column = [row[table["columns"].index(table["primary"])] for row in table["rows"]]
        assert best["value"] == (max(column) if table["higher_is_better"] else min(column))
        sections = json.loads((run_dir / stage / "export" / "report.json").read_text())
        images = [image for s in sections["sections"] for image in s.get("images", [])]
        assert images, f"{stage} has no figure"
        for image in images:
            shown = run_dir / "report" / f"{stage}_{Path(image).name}"
            assert shown.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown.name in page


@pytest.mark.parametrize("stage", CLASSIFIERS)
def test_classifier_tables_agree_with_scikit_learn_on_the_predictions(
    run_dir: Path, stage: str
) -> None:
    for model, ours in metrics_of(run_dir, stage).items():
        saved = predictions(run_dir, stage, model)
        y_true, y_pred = saved["y_true"], saved["y_pred"]
        binary = len(np.unique(y_true)) == 2
        average = "binary" if binary else "macro"
        assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert ours["precision"] == pytest.approx(
            skm.precision_score(y_true, y_pred, average=average, zero_division=0)
        )
        assert ours["recall"] == pytest.approx(skm.recall_score(y_true, y_pred, average=average))
        assert ours["f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average=average))
        if "y_score" in saved:
            score = saved["y_score"]
            if score.ndim == 1:
                expected = skm.roc_auc_score(y_true, score)
            else:  # one-vs-rest macro; per class, as scikit-learn wants probabilities for "ovr"
                classes = np.unique(y_true)
                expected = np.mean([skm.roc_auc_score(y_true == c, score[:, c]) for c in classes])
                if np.allclose(score.sum(axis=1), 1):  # probabilities: the "ovr" call itself
                    ovr = skm.roc_auc_score(y_true, score, multi_class="ovr")
                    assert expected == pytest.approx(ovr)
            assert ours["roc_auc"] == pytest.approx(expected, abs=1e-9), model
        matrix = results(run_dir, stage)["models"][model]["confusion_matrix"]
        assert matrix == skm.confusion_matrix(y_true, y_pred).tolist()


def test_logistic_regression_on_breast_cancer_is_above_90_percent(run_dir: Path) -> None:
    result = results(run_dir, "breast_cancer")["models"]["logistic_regression"]
    scores, folds = result["metrics"], result["cv_scores"]
    assert scores["accuracy"] > 0.9
    assert len(folds) == SHRINK["breast_cancer"]["cv_folds"]
    assert 0.9 < scores["cv_accuracy"] <= 1
    assert scores["cv_accuracy"] == pytest.approx(np.mean(folds))
    assert scores["cv_accuracy_std"] == pytest.approx(np.std(folds)) and np.std(folds) > 0


def test_a_csv_file_gives_the_same_result_as_the_bundled_set(run_dir: Path) -> None:
    ours = metrics_of(run_dir, "csv")["logistic_regression"]
    assert ours == metrics_of(run_dir, "breast_cancer")["logistic_regression"]


def test_regression_table_agrees_with_scikit_learn_on_the_predictions(run_dir: Path) -> None:
    for model, ours in metrics_of(run_dir, "diabetes").items():
        saved = predictions(run_dir, "diabetes", model)
        y_true, y_pred = saved["y_true"], saved["y_pred"]
        assert ours["mse"] == pytest.approx(skm.mean_squared_error(y_true, y_pred))
        assert ours["rmse"] == pytest.approx(skm.root_mean_squared_error(y_true, y_pred))
        assert ours["mae"] == pytest.approx(skm.mean_absolute_error(y_true, y_pred))
        assert ours["r2"] == pytest.approx(skm.r2_score(y_true, y_pred))
    assert metrics_of(run_dir, "diabetes")["linear"]["r2"] > 0.3


def test_unsupervised_scores_agree_with_scikit_learn(run_dir: Path) -> None:
    wine = load_dataset("builtin:wine", classes=True)
    scaled = (wine.features - wine.features.mean(axis=0)) / wine.features.std(axis=0)
    for model, ours in metrics_of(run_dir, "clustering").items():
        labels = predictions(run_dir, "clustering", model)["labels"]
        assert ours["adjusted_rand"] == pytest.approx(skm.adjusted_rand_score(wine.target, labels))
        assert ours["silhouette"] == pytest.approx(skm.silhouette_score(scaled, labels), rel=1e-6)
    assert metrics_of(run_dir, "clustering")["kmeans"]["adjusted_rand"] > 0.8
    from sklearn.manifold import trustworthiness

    digits = subsample_rows(load_dataset("builtin:digits", classes=True), 200, seed=0)
    for model, ours in metrics_of(run_dir, "embedding").items():
        embedded = predictions(run_dir, "embedding", model)["embedding"]
        expected = trustworthiness(digits.features, embedded, n_neighbors=5)
        assert ours["trustworthiness"] == pytest.approx(expected, abs=2e-3)  # ties may reorder
    assert metrics_of(run_dir, "embedding")["tsne"]["knn_accuracy"] > 0.8


def test_validation_curve_shows_variance_at_full_depth(run_dir: Path) -> None:
    tree = results(run_dir, "curves")["models"]["tree"]
    curve = tree["validation_curve"]
    assert curve["values"][-1] == 20
    assert curve["train_mean"][-1] > 0.99  # a full-depth tree memorises its rows
    assert curve["val_mean"][-1] < max(curve["val_mean"]) - 0.1  # ...and generalises worse
    assert tree["metrics"]["best_value"] == curve["values"][int(np.argmax(curve["val_mean"]))]
    learning = tree["learning_curves"]
    assert len(learning) == 3 and all(len(c["rows"]) == 6 for c in learning.values())


def test_deep_nets_share_one_budget_and_log_their_curves(run_dir: Path) -> None:
    vision = results(run_dir, "vision")["models"]
    assert {len(r["history"]) for r in vision.values()} == {3}
    assert metrics_of(run_dir, "vision")["mlp_regularized"]["accuracy"] > 0.8
    sequence = results(run_dir, "sequence")["models"]
    assert set(sequence) == {"rnn", "lstm", "gru", "transformer"}
    steps = {tuple(row["step"] for row in r["history"]) for r in sequence.values()}
    assert steps == {(10, 20)}
    params = [r["metrics"]["params"] for r in sequence.values()]
    assert max(params) < 1.2 * min(params)  # the recipe sizes the nets alike
    for r in sequence.values():  # 20 steps already beat a model that ignores context
        assert r["history"][-1]["val_bits_per_byte"] < r["history"][0]["val_bits_per_byte"]
    rows = read_metrics(run_dir / "sequence")
    assert [row["gru/step"] for row in rows if "gru/step" in row] == [10, 20]
    steps_logged = [row["step"] for row in rows]
    assert steps_logged == sorted(set(steps_logged))  # one increasing step per tracked row


def test_a_bad_estimator_fails_in_one_line_before_training(tmp_path: Path) -> None:
    stage = {
        "kind": "baseline",
        "task": "classification",
        "dataset": "builtin:wine",
        "models": {
            "svm": {"estimator": "sklearn.svm.SVC"},
            "forest": {"estimator": "sklearn.ensemble.RandomForestClasifier"},
        },
    }
    recipe = {"name": "bad", "run_dir": str(tmp_path / "run"), "stages": {"clf": stage}}
    recipe["tracking"] = {"mode": "disabled"}
    result = cli("run", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert error == [
        "error: stages.clf.models.forest.estimator: sklearn.ensemble has no class "
        "'RandomForestClasifier'; did you mean sklearn.ensemble.RandomForestClassifier?"
    ]
    assert not (tmp_path / "run" / "clf" / "checkpoints" / "svm.json").exists()


def test_killed_stage_resumes_without_redoing_finished_models(tmp_path: Path) -> None:
    stage = {
        "kind": "baseline",
        "task": "classification",
        "dataset": "builtin:digits",
        "models": {
            "svm": {"estimator": "sklearn.svm.SVC"},
            "forest": {
                "estimator": "sklearn.ensemble.RandomForestClassifier",
                "params": {"n_estimators": 300},
            },
        },
    }
    recipe = {"name": "resume", "tracking": {"mode": "disabled"}, "stages": {"clf": stage}}
    reference, resumed = kill_then_resume(tmp_path, recipe, "clf/checkpoints/svm.json")
    assert read_manifest(resumed / "clf")["attempts"] == 2
    log = (resumed / "clf" / "stage.log").read_text()
    assert "svm: finished in an earlier attempt" in log
    assert "forest: finished in an earlier attempt" not in log
    rows = read_metrics(resumed / "clf")  # one row per model, steps continuing the first attempt
    assert [(row["step"], sorted({k.split("/")[0] for k in row if "/" in k})) for row in rows] == [
        (1, ["svm"]),
        (2, ["forest"]),
    ]
    ours, theirs = results(resumed, "clf"), results(reference, "clf")
    for model in ("svm", "forest"):
        assert ours["models"][model]["metrics"] == theirs["models"][model]["metrics"]
        assert (
            predictions(resumed, "clf", model)["y_score"]
            == predictions(reference, "clf", model)["y_score"]
        ).all()
