"""Rerun semantics, failures and status, through the real CLI on a tiny real recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

STAGES = ["tokenizer", "tokenize", "pretrain", "eval"]


def _starts(run_dir: Path) -> dict[str, str]:
    return {
        s: read_manifest(run_dir / s).get("started_at", "")
        + str(read_manifest(run_dir / s).get("attempts"))
        for s in STAGES
    }


def _reran(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {s for s in STAGES if before[s] != after[s]}


def _run(recipe: Path, *args: str) -> str:
    result = cli("run", str(recipe), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rerun_semantics(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(run_dir))
    _run(recipe)
    for stage in STAGES:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "done", (stage, manifest)
        assert manifest["outputs"], stage
    assert (run_dir / "recipe.yaml").is_file()
    assert (run_dir / "pretrain" / "stage.log").is_file()
    first = _starts(run_dir)

    plan = cli("run", str(recipe), "--dry-run").stdout
    assert plan.count("skip") == 4 and "up to date" in plan
    _run(recipe)
    assert _reran(first, _starts(run_dir)) == set()

    before = _starts(run_dir)
    _run(recipe, "-o", "stages.eval.max_new_tokens=3")
    assert _reran(before, _starts(run_dir)) == {"eval"}

    before = _starts(run_dir)
    lr = ("-o", "stages.pretrain.optim.lr=5e-4")
    _run(recipe, *lr)
    assert _reran(before, _starts(run_dir)) == {"pretrain", "eval"}

    before = _starts(run_dir)
    _run(recipe, *lr, "--only", "eval")
    assert _reran(before, _starts(run_dir)) == {"eval"}

    before = _starts(run_dir)
    _run(recipe, *lr, "--from", "pretrain")
    assert _reran(before, _starts(run_dir)) == {"pretrain", "eval"}

    status = cli("status", str(run_dir))  # reads the resolved recipe of the last run
    assert status.returncode == 0
    for stage in STAGES:
        assert stage in status.stdout
    assert "stale" not in status.stdout and status.stdout.count("done") >= 4


def test_failed_stage_is_marked_failed_and_blocks_dependents(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    data = tiny_recipe(run_dir)
    data["stages"]["pretrain"]["seq_len"] = 1_000_000
    recipe = write_recipe(tmp_path / "tiny.yaml", data)
    result = cli("run", str(recipe))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "seq_len" in error_lines[0], result.stderr
    pretrain = read_manifest(run_dir / "pretrain")
    assert pretrain["status"] == "failed" and "seq_len" in pretrain["error"]
    assert read_manifest(run_dir / "tokenize")["status"] == "done"
    assert read_manifest(run_dir / "eval") == {}
    # What was computed is kept: a fixed rerun does not redo tokenizer/tokenize.
    data["stages"]["pretrain"]["seq_len"] = 32
    write_recipe(recipe, data)
    plan = cli("run", str(recipe), "--dry-run").stdout
    assert "tokenize" in plan and plan.count("skip") == 2


def test_only_refuses_when_upstream_is_missing(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs" / "tiny"))
    result = cli("run", str(recipe), "--only", "pretrain")
    assert result.returncode == 2
    assert "upstream stage 'tokenize' is not up to date" in result.stderr


def test_recipes_command_lists_bundled_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.engine.config import bundled_recipes, bundled_recipes_dir, read_recipe

    monkeypatch.setenv("COLUMNS", "250")  # wide enough that no name wraps
    result = cli("recipes")
    assert result.returncode == 0
    cells = [line.split("│")[1:3] for line in result.stdout.splitlines() if line.startswith("│")]
    rows = {name.strip(): description.strip() for name, description in cells if name.strip()}
    root = bundled_recipes_dir()
    for path in bundled_recipes():  # every recipe, with the start of its description
        name = str(path.relative_to(root).with_suffix(""))
        assert rows[name] and read_recipe(path)["description"].startswith(rows[name][:30]), name


def test_unknown_stage_for_from(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs" / "tiny"))
    result = cli("run", str(recipe), "--from", "pretrian")
    assert result.returncode == 2 and "did you mean 'pretrain'" in result.stderr
    assert "Traceback" not in result.stderr
