"""What the curate stage's fingerprint covers: its decontamination items come from the tasks every
stage of the recipe names, so a task changed in another stage must make curate run again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_prep.curate import recipe_tasks
from data_prep.curate_steps import task_label
from pipeline.engine.config import Recipe, validate_recipe
from pipeline.engine.graph import fingerprints


def recipe(corpus: Path, task: str, curate: dict[str, Any] | None = None) -> Recipe:
    """curate, and a tokenizer stage reading problems of `task` (a task the recipe names)."""
    stages = {
        "curate": {"kind": "curate", "source": str(corpus), **(curate or {})},
        "tokenizer": {"kind": "tokenizer", "source": {"uri": "builtin:task",
                                                      "task": {"name": task}}},
    }  # fmt: skip
    return validate_recipe({"name": "fp", "stages": stages})


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "some text to curate"}) + "\n")
    return path


def test_curate_searches_for_the_tasks_other_stages_name(corpus: Path) -> None:
    for task in ("sort", "arithmetic"):
        found = recipe_tasks(recipe(corpus, task))
        assert [task_label(t) for t in found] == [f"task {task}"]


def test_curate_fingerprint_follows_its_own_tasks(corpus: Path) -> None:
    before = fingerprints(recipe(corpus, "sort"))["curate"]
    own = {"decontaminate": {"tasks": [{"name": "arithmetic"}]}}
    assert fingerprints(recipe(corpus, "sort", own))["curate"] != before


def test_curate_fingerprint_follows_a_task_another_stage_names(corpus: Path) -> None:
    sort, arithmetic = recipe(corpus, "sort"), recipe(corpus, "arithmetic")
    assert fingerprints(sort)["curate"] != fingerprints(arithmetic)["curate"]
