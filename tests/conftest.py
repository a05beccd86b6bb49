"""Fixtures shared by the test modules; the helpers they import are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_recipe, write_recipe


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs" / "tiny"))
