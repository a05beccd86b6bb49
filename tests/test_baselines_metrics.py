"""Baseline building blocks: metrics against scikit-learn's own, tabular data, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.manifold import trustworthiness as sk_trustworthiness

from pipeline.baselines import metrics as tabular
from pipeline.baselines.data import fold_rows, load_dataset, split_rows
from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import PipelineError, RecipeError


def _noisy_predictions(rng: np.random.Generator, num_classes: int, n: int = 300):
    """Labels, predictions right ~60% of the time, and per-class probabilities with ties."""
    y_true = rng.integers(0, num_classes, n)
    guess = rng.integers(0, num_classes, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, guess)
    scores = np.round(rng.random((n, num_classes)), 1) + 0.01  # rounded: many tied scores
    return y_true, y_pred, scores / scores.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_classification_metrics_match_scikit_learn(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    y_true, y_pred, proba = _noisy_predictions(rng, num_classes)
    ours = tabular.classification_metrics(y_true, y_pred, proba, num_classes)
    average = "binary" if num_classes == 2 else "macro"
    auc_scores = proba[:, 1] if num_classes == 2 else proba
    theirs = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "precision": skm.precision_score(y_true, y_pred, average=average, zero_division=0),
        "recall": skm.recall_score(y_true, y_pred, average=average, zero_division=0),
        "f1": skm.f1_score(y_true, y_pred, average=average, zero_division=0),
        "roc_auc": skm.roc_auc_score(y_true, auc_scores, multi_class="ovr"),
    }
    assert ours == pytest.approx(theirs, abs=1e-12)
    matrix = tabular.confusion_matrix(y_true, y_pred, num_classes)
    assert (matrix == skm.confusion_matrix(y_true, y_pred, labels=range(num_classes))).all()


def test_macro_average_skips_classes_absent_on_both_sides_like_scikit_learn() -> None:
    y_true = np.array([0, 0, 1, 1, 3, 3])  # class 2 never occurs; class 3 never predicted
    y_pred = np.array([0, 1, 1, 1, 0, 1])
    ours = tabular.classification_metrics(y_true, y_pred, num_classes=4)
    assert ours["precision"] == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert ours["f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert ours["roc_auc"] is None


def test_regression_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=80) * 50 + 150
    y_pred = y_true + rng.normal(size=80) * 30
    ours = tabular.regression_metrics(y_true, y_pred)
    assert ours["mse"] == pytest.approx(skm.mean_squared_error(y_true, y_pred))
    assert ours["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y_true, y_pred)))
    assert ours["mae"] == pytest.approx(skm.mean_absolute_error(y_true, y_pred))
    assert ours["r2"] == pytest.approx(skm.r2_score(y_true, y_pred))
    assert tabular.regression_metrics(np.ones(4), np.ones(4))["r2"] == skm.r2_score(
        np.ones(4), np.ones(4)
    )


def test_clustering_and_embedding_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 6)) * 4
    truth = rng.integers(0, 4, 240)
    features = centres[truth] + rng.normal(size=(240, 6))
    labels = np.where(rng.random(240) < 0.8, truth, -1)  # -1: DBSCAN-style noise
    assert tabular.silhouette(features, labels) == pytest.approx(
        skm.silhouette_score(features, labels), rel=1e-9
    )
    assert tabular.adjusted_rand(truth, labels) == pytest.approx(
        skm.adjusted_rand_score(truth, labels)
    )
    assert tabular.adjusted_rand(truth, truth + 5) == 1.0  # names of clusters do not matter
    assert tabular.silhouette(features, np.zeros(240)) is None  # one cluster: undefined
    embedded = features[:, :2] + rng.normal(size=(240, 2))
    for k in (1, 5, 12):
        assert tabular.trustworthiness(features, embedded, k) == pytest.approx(
            sk_trustworthiness(features, embedded, n_neighbors=k)
        )


def test_pairwise_scores_are_exact_across_distance_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    whole = tabular.silhouette(features, labels), tabular.trustworthiness(features, features[:, :2])
    monkeypatch.setattr(tabular, "CHUNK_ROWS", 7)  # many blocks, the last one partial
    blocked = (
        tabular.silhouette(features, labels),
        tabular.trustworthiness(features, features[:, :2]),
    )
    assert blocked == pytest.approx(whole)


def test_neighbour_accuracy_separates_clean_from_shuffled_classes() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 40)
    clean = np.eye(3)[labels, :2] * 10 + rng.normal(size=(120, 2)) * 0.1
    assert tabular.neighbour_accuracy(clean, labels, 5) == 1.0
    assert tabular.neighbour_accuracy(rng.normal(size=(120, 2)), labels, 5) < 0.6


def test_mean_std_is_population_spread() -> None:
    spread = tabular.mean_std([0.8, 0.9, 1.0])
    assert spread == pytest.approx({"mean": 0.9, "std": np.sqrt(0.02 / 3)})


def test_csv_dataset_with_text_labels_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,target\n1,2,cat\n3,4,dog\n5,6,cat\n")
    data = load_dataset(str(path), "target", classes=True)
    assert data.features.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert data.target.tolist() == [0, 1, 0] and data.target_names == ["cat", "dog"]
    with pytest.raises(PipelineError, match="not numeric; use task: classification"):
        load_dataset(str(path), "target", classes=False)
    with pytest.raises(PipelineError, match=r"no column 'label' \(columns: a, b, target\)"):
        load_dataset(str(path), "label", classes=True)
    path.write_text("a,target\nx,1\n2,3\n4,5\n")
    with pytest.raises(PipelineError, match="line 2: column 'a' is not numeric"):
        load_dataset(str(path), "target")


def test_splits_and_folds_are_seeded_stratified_and_cover_every_row() -> None:
    target = load_dataset("builtin:wine", classes=True).target
    train, test = split_rows(target, 0.25, seed=3, stratify=True)
    again, _ = split_rows(target, 0.25, seed=3, stratify=True)
    other, _ = split_rows(target, 0.25, seed=4, stratify=True)
    assert (train == again).all() and not np.array_equal(train, other)
    assert not set(train) & set(test) and len(train) + len(test) == len(target)
    share = np.bincount(target[test]) / np.bincount(target)
    assert share == pytest.approx(0.25, abs=0.03)  # every class split alike
    folds = fold_rows(target[train], 5, seed=3, stratify=True)
    validation = np.sort(np.concatenate([val for _, val in folds]))
    assert (validation == np.arange(len(train))).all()


def _recipe(models: dict, task: str = "classification", **stage: object) -> dict:
    spec = {"kind": "baseline", "task": task, "dataset": "builtin:wine", "models": models}
    return {"name": "b", "stages": {"clf": {**spec, **stage}}}


def test_model_spec_errors_name_the_model_and_key() -> None:
    bad = {
        "a": {"estimator": "sklearn.svm.SVC", "parms": {"C": 1}},
        "b": {"steps": [{"estimator": "sklearn.svm.SVC", "params": 3}]},
        "c": {"estimator": "sklearn.svm.SVC", "steps": [{"estimator": "sklearn.svm.SVC"}]},
    }
    with pytest.raises(RecipeError) as caught:
        validate_recipe(_recipe(bad))
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert "stages.clf.models.a.parms" in lines[0] and "did you mean 'params'" in lines[0]
    assert "stages.clf.models.b.steps.0.params" in lines[1]
    assert "stages.clf.models.c" in lines[2] and "either estimator" in lines[2]
    with pytest.raises(RecipeError, match=r"stages.clf.models.m.net: got 'lstm'"):
        validate_recipe(_recipe({"m": {"net": "lstm"}}, task="vision"))
    with pytest.raises(RecipeError, match="did you mean 'regression'"):
        validate_recipe(_recipe({"m": {"estimator": "x.Y"}}, task="regresion"))
    with pytest.raises(RecipeError, match="one process"):
        validate_recipe(_recipe({"m": {"estimator": "x.Y"}}, launch={"nproc": 2}))


def test_validated_models_carry_their_preset_values() -> None:
    recipe = validate_recipe(_recipe({"m": {"net": "cnn"}}, task="vision"))
    stage = recipe.stages["clf"]
    assert stage.models["m"]["channels"] == [16, 32] and stage.options["epochs"] == 20
    assert validate_recipe(recipe.model_dump(mode="json")).stages["clf"] == stage
