"""Typed stage inputs: every kind declares a spec, and the plan resolves and checks every input
(upstream stages by output type, model directories by content) before anything runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.dag import Graph
from pipeline.engine.graph import fingerprints
from pipeline.engine.inputs import plan_problems, resolve_inputs, spec_of
from pipeline.engine.kinds import KINDS
from pipeline.engine.locations import Location, location_problem
from pipeline.engine.yaml_io import substitute_vars


def recipe(tmp_path: Path, stages: dict[str, Any]) -> Any:
    return validate_recipe({"name": "t", "run_dir": str(tmp_path / "run"), "stages": stages})


def model_dir(path: Path, **config: Any) -> Path:
    """A directory shaped like a downloaded model (no real weights are needed to plan)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    (path / "tokenizer.json").write_text("{}")
    return path


LM_CHAIN = {
    "tokenizer": {"kind": "tokenizer", "source": "builtin:python-stdlib"},
    "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": "builtin:python-stdlib"},
    "pretrain": {"kind": "pretrain", "after": ["tokenize"]},
    "sft": {"kind": "sft", "after": ["pretrain"]},
}


def test_every_kind_declares_a_spec_of_its_own_config() -> None:
    for kind in KINDS:
        spec = spec_of(kind)
        assert spec.config.model_fields["kind"].default in (kind, None) or kind in str(
            spec.config.model_fields["kind"].annotation
        )
        for declared in spec.inputs:
            assert declared.accepts or declared.location, (kind, declared.name)


def test_graph_answers_order_upstream_downstream_and_nearest(tmp_path: Path) -> None:
    graph = Graph(recipe(tmp_path, LM_CHAIN))
    assert graph.order == ["tokenizer", "tokenize", "pretrain", "sft"]
    assert graph.upstream("sft") == {"tokenizer", "tokenize", "pretrain"}
    assert graph.downstream({"tokenize"}) == {"tokenize", "pretrain", "sft"}
    assert graph.nearest("sft", lambda s: s.startswith("token")) == "tokenize"
    assert graph.nearest("tokenizer", lambda s: True) is None


def test_inputs_resolve_to_the_nearest_stage_of_their_type_or_a_directory(tmp_path: Path) -> None:
    base = model_dir(tmp_path / "base")
    stages = {
        **LM_CHAIN,
        "eval": {
            "kind": "eval",
            "after": ["sft"],
            "models": [{"path": str(base)}, "pretrain", "sft"],
        },
    }
    r = recipe(tmp_path, stages)
    resolved, problems = resolve_inputs(r, "eval")
    assert problems == []
    assert [m.label for m in resolved["models"]] == [str(base), "pretrain", "sft"]
    assert resolved["models"][0].path == base and resolved["models"][0].external
    assert resolved["models"][2].path == tmp_path / "run" / "sft" / "export"
    assert resolved["tokens"][0].stage == "tokenize"  # nearest upstream of type tokens
    assert resolve_inputs(r, "sft")[0]["model"][0].stage == "pretrain"


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (["tokenize"], "stages.eval.models.0: 'tokenize' is a tokenize stage (it makes tokens); "
                       "name a stage that makes lm (pretrain, sft, rlhf)"),
        (["sfft"], "stages.eval.models.0: no stage 'sfft'; did you mean 'sft'?"),
        (["late"], "stages.eval.models.0: 'late' is not upstream of eval; add it to stages.eval.after"),
    ],
)  # fmt: skip
def test_a_wrong_stage_reference_is_one_line_naming_the_fix(
    tmp_path: Path, models: list[str], expected: str
) -> None:
    stages = {
        **LM_CHAIN,
        "late": {"kind": "sft", "after": ["pretrain"]},
        "eval": {"kind": "eval", "after": ["sft"], "models": models},
    }
    problems = plan_problems(recipe(tmp_path, stages))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_stage_without_its_required_input_is_refused(tmp_path: Path) -> None:
    problems = plan_problems(recipe(tmp_path, {"sft": {"kind": "sft"}}))
    assert problems == [
        "stages.sft: needs an upstream stage that makes lm (pretrain, sft, rlhf); add one to "
        "its `after:` list or set model: {path: DIR}"
    ]


def test_model_directory_problems_are_one_line_each(tmp_path: Path) -> None:
    where = "stages.sft.model"
    missing = Location(path=str(tmp_path / "nope"))
    assert location_problem(missing, "model", where).endswith(
        "no such directory; give the folder that holds config.json"
    )
    hub = location_problem(Location(path="Qwen/Qwen2.5-0.5B"), "model", where)
    assert "hub ids are not downloaded here" in hub and "\n" not in hub
    (tmp_path / "empty").mkdir()
    assert "no config.json" in location_problem(
        Location(path=str(tmp_path / "empty")), "model", where
    )
    remote = model_dir(tmp_path / "remote", auto_map={"AutoModel": "modeling.Thing"})
    assert "trust_remote_code" in location_problem(Location(path=str(remote)), "model", where)
    bare = model_dir(tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    assert "no weight files" in location_problem(Location(path=str(bare)), "model", where)
    good = model_dir(tmp_path / "good")
    assert location_problem(Location(path=str(good)), "model", where) is None


def test_a_changed_model_directory_changes_the_fingerprints_downstream(tmp_path: Path) -> None:
    base = model_dir(tmp_path / "base")
    stages = {
        "sft": {"kind": "sft", "model": {"path": str(base)}},
        "eval": {"kind": "eval", "after": ["sft"]},
        "other": {"kind": "sft", "model": {"path": str(model_dir(tmp_path / "other"))}},
    }
    r = recipe(tmp_path, stages)
    before = fingerprints(r)
    stat = (base / "model.safetensors").stat()
    os.utime(base / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = fingerprints(r)
    assert touched["sft"] != before["sft"] and touched["eval"] != before["eval"]
    assert touched["other"] == before["other"]
    (base / "tokenizer.json").write_text('{"changed": true}')
    assert fingerprints(r)["sft"] not in (before["sft"], touched["sft"])


def test_recipe_variables_substitute_whole_values_and_text() -> None:
    data = {
        "vars": {"model": "/m", "task": {"name": "sort"}},
        "stages": {
            "a": {"model": {"path": "${model}"}, "task": "${task}", "note": "from ${model}/x"}
        },
    }
    out = substitute_vars(data, "r.yaml")
    assert out["stages"]["a"] == {
        "model": {"path": "/m"},
        "task": {"name": "sort"},
        "note": "from /m/x",
    }
    with pytest.raises(Exception, match=r"r.yaml: stages.a.x: \$\{nope\} is not in vars"):
        substitute_vars({"vars": {}, "stages": {"a": {"x": "${nope}"}}}, "r.yaml")
