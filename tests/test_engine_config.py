"""Recipe validation: one-line errors with key paths, suggestions and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli as cli_module
from pipeline.engine.config import bundled_recipes, load_recipe, read_recipe
from pipeline.engine.errors import RecipeError
from tests.helpers import cli, tiny_recipe, write_recipe


def _error(tmp_path: Path, mutate) -> str:
    data = tiny_recipe(tmp_path / "runs")
    mutate(data)
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", data))
    return str(info.value)


@pytest.mark.e2e
def test_misspelt_key_one_line_with_suggestion_and_exit_2(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path / "runs")
    data["stages"]["pretrain"]["max_stepz"] = 5
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", data)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "stages.pretrain.max_stepz" in lines[0]
    assert "did you mean 'max_steps'" in lines[0]
    assert "Traceback" not in result.stderr


def test_nested_misspelt_key_suggests_within_its_block(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["pretrain"].update(optim={"lrr": 1e-3}))
    assert "stages.pretrain.optim.lrr: unknown key; did you mean 'lr'?" in msg


def test_a_task_option_of_another_family_names_this_familys_options(tmp_path: Path) -> None:
    """A task is a union tagged by `name`: the error lists the named family's own keys."""
    msg = _error(
        tmp_path,
        lambda d: d["stages"]["pretrain"].update(eval_task={"name": "addition", "min_length": 3}),
    )
    assert "stages.pretrain.eval_task.addition.min_length: unknown key; did you mean " in msg
    assert "'min_digits'? (allowed: balance, format, held_out, max_digits, min_digits, name," in msg


def test_a_check_across_keys_names_its_stage_and_the_fix_in_one_line() -> None:
    """A stage's model validator (keys that do not fit together) reads `stages.NAME: message`,
    without pydantic's "Value error" or the stage's mapping."""
    with pytest.raises(RecipeError) as info:
        load_recipe("demo", ["stages.rlhf.rewards=[exact,steps]", "stages.rlhf.task.format=direct"])
    (line,) = str(info.value).splitlines()
    assert line.endswith(
        ": stages.rlhf: reward steps scores worked steps; set the task's format: cot"
    )


def test_wrong_type_names_path_and_value(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["pretrain"].update(max_steps="lots"))
    assert "stages.pretrain.max_steps: got 'lots'" in msg
    assert "integer" in msg


def test_unknown_kind_suggests(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["pretrain"].update(kind="pretrian"))
    assert "unknown kind 'pretrian'; did you mean 'pretrain'?" in msg


def test_unknown_stage_in_after(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["eval"].update(after=["pretrian"]))
    assert "stages.eval.after: unknown stage 'pretrian'; did you mean 'pretrain'?" in msg


def test_cycle_rejected(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["tokenizer"].update(after=["pretrain"]))
    # The loop as `after` walks it, from the first stage in recipe order back to itself.
    assert msg == (
        "stages: dependency cycle tokenizer -> pretrain -> tokenize -> tokenizer; "
        "remove one `after` entry"
    )


def test_impossible_setting_rejected(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda d: d["stages"]["pretrain"]["model"].update(hidden_size=33))
    assert "stages.pretrain.model" in msg and "divisible" in msg


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs"))
    recipe = load_recipe(path, ["stages.pretrain.optim.lr=3e-4", "stages.eval.prompts=[a, b]"])
    assert recipe.stages["pretrain"].optim.lr == pytest.approx(3e-4)
    assert recipe.stages["eval"].prompts == ["a", "b"]
    with pytest.raises(RecipeError, match="stages.pretrain.optim.lrr"):
        load_recipe(path, ["stages.pretrain.optim.lrr=1"])


def _run_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`pipeline run ARGS` in this process (the recipe is refused before any stage starts)."""
    code = cli_module.main(["run", *args])
    return code, capsys.readouterr().err


def test_malformed_yaml_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: {a: [\n")
    assert _run_here(capsys, str(bad)) == (
        2,
        f"error: {bad} line 3: malformed YAML (expected the node content, but found "
        "'<stream end>'); fix the syntax\n",
    )
    code, err = _run_here(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'nope.yaml'}: no such recipe")
    assert len(err.splitlines()) == 1


def test_non_utf8_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert _run_here(capsys, str(bad)) == (
        2,
        f"error: {bad}: not UTF-8 text (invalid continuation byte); save the recipe as UTF-8\n",
    )


@pytest.mark.parametrize("path", bundled_recipes(), ids=lambda p: p.stem)
def test_every_bundled_recipe_validates(path: Path) -> None:
    required = [k for k, v in (read_recipe(path).get("vars") or {}).items() if v is None]
    recipe = load_recipe(path, [f"vars.{name}=/models/some-model" for name in required])
    assert recipe.stages
    assert recipe.description, f"{path} needs a one-line description for `pipeline recipes`"


def test_optimiser_keys_are_spelled_the_same_in_every_training_stage() -> None:
    overrides = [f"stages.{s}.optim.lr=2e-4" for s in ("pretrain", "sft", "rlhf")]
    recipe = load_recipe("demo", [*overrides, "stages.rlhf.schedule.warmup_steps=3"])
    assert {recipe.stages[s].optim.lr for s in ("pretrain", "sft", "rlhf")} == {2e-4}
    assert recipe.stages["rlhf"].schedule.warmup_steps == 3
    for old, new in (("lr", "optim.lr"), ("warmup_steps", "schedule.warmup_steps")):
        with pytest.raises(RecipeError, match=rf"stages\.sft.*`{old}` moved to `{new}`") as error:
            load_recipe("demo", [f"stages.sft.{old}=1e-3"])
        assert "\n" not in str(error.value)


def test_a_recipe_variable_left_null_is_required_and_set_by_an_override() -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe("llm/finetune")
    assert "vars.model is required" in str(error.value)
    assert "-o vars.model=VALUE" in str(error.value) and "\n" not in str(error.value)
    recipe = load_recipe("llm/finetune", ["vars.model=/models/qwen", "vars.task.name=reverse"])
    assert recipe.stages["sft"].model.path == "/models/qwen"  # type: ignore[attr-defined]
    assert recipe.stages["eval"].models[0].path == "/models/qwen"  # type: ignore[attr-defined]
    assert recipe.stages["rlhf"].task.name == "reverse"  # a whole mapping substituted


def test_a_key_given_twice_in_one_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: twice\nstages:\n  tokenizer:\n    kind: tokenizer\n    vocab_size: 500\n"
        "    vocab_size: 800\n"
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == (
        f"{path} line 6: key 'vocab_size' appears twice in one mapping (first on line 5); "
        f"keep one of them"
    )
