"""The CLI explains itself: `pipeline show KIND|RECIPE`, `extends:` in recipes, a frozen surface."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from pipeline import cli as cli_module
from pipeline.engine.config import (
    bundled_recipes,
    bundled_recipes_dir,
    load_recipe,
    read_recipe,
    stage_kinds,
)
from pipeline.engine.config_docs import describe_config
from pipeline.engine.errors import RecipeError
from pipeline.engine.graph import fingerprints, plan
from tests.helpers import cli, tiny_recipe, write_recipe

# Every subcommand and its flags (positionals by dest). A change here is a change to the CLI
# users script against: update this deliberately, with the README.
CLI_SURFACE = {
    "run": ["--dry-run", "--force", "--from", "--only", "--override", "--rescan", "-o", "recipe"],
    "submit": ["--dry-run", "--from", "--only", "--override", "-o", "recipe"],
    "status": ["--override", "--rescan", "--verify", "-o", "target"],
    "report": ["run_dir"],
    "recipes": [],
    "show": ["--override", "-o", "target"],
}


def _surface(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """{subcommand: sorted option strings and positional names}, read from the parser itself."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(
            flag
            for action in command._actions
            if not isinstance(action, argparse._HelpAction)
            for flag in (action.option_strings or [action.dest])
        )
        for name, command in sub.choices.items()
    }


def test_cli_surface_is_frozen() -> None:
    parser = cli_module.build_parser()
    assert [a.option_strings for a in parser._actions if a.option_strings] == [["-h", "--help"]]
    assert _surface(parser) == CLI_SURFACE


def _show(monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """`pipeline show ARGS` in this process on a 100-column console; returns what it printed."""
    out = io.StringIO()
    monkeypatch.setattr(cli_module, "console", Console(file=out, width=100, highlight=False))
    assert cli_module.main(["show", *args]) == 0
    return out.getvalue()


def test_show_kind_lists_nested_fields_with_descriptions(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {doc.name: doc for doc in describe_config(stage_kinds()["pretrain"])}
    assert docs["max_steps"].description == "optimizer steps"
    assert docs["max_steps"].type == "int" and docs["max_steps"].default == "200"
    assert docs["micro_batch_size"].description == "sequences per rank per micro step"
    assert docs["optim.lr"].type == "float" and docs["optim.lr"].default == "0.001"
    assert docs["optim.lr"].description == "peak learning rate"
    assert docs["optim.grad_clip"].description.startswith("max global grad norm")
    assert docs["precision"].type == "'auto' | 'fp32' | 'bf16'"
    assert docs["optim"].default == "(below)"
    assert {"model.arch", "schedule.warmup_steps", "launch.nproc"} <= set(docs)
    table = _show(monkeypatch, "pretrain")
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 100
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if "│" in line}
    assert "optimizer steps" in rows["max_steps"]
    assert "sequences per rank per micro step" in rows["micro_batch_size"]
    assert "0.001" in rows["optim.lr"]
    for kind in stage_kinds():  # every kind fits 100 columns without cutting a name
        table = _show(monkeypatch, kind)
        assert "…" not in table and max(len(line) for line in table.splitlines()) <= 100


@pytest.mark.e2e
def test_show_kind_in_a_real_process_at_100_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    result = cli("show", "pretrain")
    assert result.returncode == 0, result.stderr
    assert "optim.lr" in result.stdout and "activation_checkpointing" in result.stdout
    assert "…" not in result.stdout


def test_show_recipe_prints_the_resolved_recipe(
    monkeypatch: pytest.MonkeyPatch, recipe_path: Path
) -> None:
    out = _show(monkeypatch, str(recipe_path), "-o", "stages.pretrain.max_steps=7")
    data = yaml.safe_load(out)
    assert data["stages"]["pretrain"]["max_steps"] == 7
    assert data["stages"]["pretrain"]["optim"]["lr"] == 0.001  # defaults are filled in
    assert out == load_recipe(recipe_path, ["stages.pretrain.max_steps=7"]).to_yaml()
    bundled = yaml.safe_load(_show(monkeypatch, "llm/llama", "-o", "stages.pretrain.optim.lr=5e-4"))
    assert bundled["stages"]["pretrain"]["optim"]["lr"] == 5e-4
    assert list(bundled["stages"])[:2] == ["tokenizer", "tokenize"]  # from the extended base
    assert "extends" not in bundled


def test_show_unknown_name_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_module.main(["show", "pretrian"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pretrian" in err and "did you mean 'pretrain'" in err and "sft" in err


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_recipe(path, data)


def test_extends_deep_merges(tmp_path: Path) -> None:
    full = tiny_recipe(tmp_path / "runs" / "tiny")
    _write(tmp_path / "bases" / "root.yaml", {"seed": 3, "tracking": {"mode": "disabled"}})
    _write(tmp_path / "bases" / "base.yaml", {**full, "extends": "root.yaml"})
    child = {
        "extends": "bases/base.yaml",
        "name": "child",
        "tracking": {"tags": ["a"]},  # merges with the base's tracking
        "stages": {
            "pretrain": {"model": {"hidden_size": 64}, "optim": {"lr": 5e-4}},
            "eval": {"prompts": ["x"], "max_new_tokens": None},  # a list and a null replace
        },
    }
    data = read_recipe(_write(tmp_path / "child.yaml", child))
    assert "extends" not in data and data["name"] == "child" and data["seed"] == 3
    assert data["tracking"] == {"mode": "disabled", "tags": ["a"]}
    pretrain = data["stages"]["pretrain"]
    assert pretrain["model"] == {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
    assert pretrain["optim"] == {"lr": 5e-4} and pretrain["max_steps"] == 8
    assert data["stages"]["eval"]["prompts"] == ["x"]
    assert data["stages"]["eval"]["max_new_tokens"] is None
    assert list(data["stages"]) == ["tokenizer", "tokenize", "pretrain", "eval"]


def test_extends_missing_base_names_file_and_recipe(tmp_path: Path) -> None:
    path = _write(tmp_path / "child.yaml", {"extends": "nope.yaml", "name": "c", "stages": {}})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "child.yaml" in message and "nope.yaml" in message and "\n" not in message


def test_extends_cycle_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"}).resolve()
    b = _write(tmp_path / "b.yaml", {"extends": "a.yaml", "stages": {}}).resolve()
    assert cli_module.main(["run", str(a)]) == 2
    captured = capsys.readouterr()
    # The file whose `extends` closes the loop, then the whole loop from the recipe given.
    assert captured.err == (
        f"error: {b}: extends: cycle {a} -> {b} -> {a}; remove one of these `extends`\n"
    )
    assert captured.out == ""


def test_extends_gives_the_fingerprints_of_the_spelled_out_recipe(tmp_path: Path) -> None:
    full = tiny_recipe(tmp_path / "runs" / "tiny")
    stages = full["stages"]
    base = {"stages": {k: stages[k] for k in ("tokenizer", "tokenize")}}
    child = {**full, "extends": "base.yaml", "stages": {k: stages[k] for k in ("pretrain", "eval")}}
    _write(tmp_path / "base.yaml", base)
    spelled = load_recipe(_write(tmp_path / "full.yaml", full))
    extended = load_recipe(_write(tmp_path / "child.yaml", child))
    assert extended.to_yaml() == spelled.to_yaml()
    assert fingerprints(extended) == fingerprints(spelled)
    assert plan(extended) == plan(spelled)


def test_bases_are_not_listed_and_each_is_extended() -> None:
    root = bundled_recipes_dir()
    bases = {p for p in root.rglob("*.yaml") if p not in bundled_recipes()}
    assert bases and all(p.name.startswith("_") for p in bases)
    used = set()
    for path in bundled_recipes():
        spec = yaml.safe_load(path.read_text()).get("extends")
        if spec:
            used.add((path.parent / spec).resolve())
    assert {p.resolve() for p in bases} <= used, "a base file no bundled recipe extends"
