"""Planning an image folder: only changed directories are listed and stat'ed; `--rescan` (and a
plan that runs a stage) stats every file, so an in-place edit is seen (data_prep/image_listing.py)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from data_prep.image_listing import folder_signature
from pipeline import cli as cli_module
from pipeline.engine.config import Recipe, validate_recipe
from pipeline.engine.graph import plan, rescan
from pipeline.engine.manifest import read_manifest
from pipeline.engine.runner import run_recipe

CLASSES = ("a", "b", "c")


def _bmp(shade: int) -> bytes:
    """A 4x4 grey BMP (its size depends only on its shape)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4, 4), shade).save(buffer, format="BMP")
    return buffer.getvalue()


def _folder(root: Path, per_class: int) -> Path:
    """`per_class` BMPs in each of three class folders, every file and directory dated back an
    hour, as for a dataset written a while ago."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.bmp").write_bytes(_bmp(i % 256))
    past = time.time() - 3600
    for path in [root, *root.rglob("*")]:
        os.utime(path, (past, past))
    return root


def _recipe(tmp_path: Path, folder: Path, **config: object) -> Recipe:
    return validate_recipe(
        {
            "name": "imgs",
            "run_dir": str(tmp_path / "run"),
            "tracking": {"mode": "disabled"},
            "stages": {"images": {"kind": "images", "source": str(folder), "val_fraction": 0,
                                  **config}},
        }
    )  # fmt: skip


def _decision(recipe: Recipe) -> tuple[bool, str]:
    step = plan(recipe)[0]
    return step.run, step.reason


def _edit_in_place(path: Path) -> None:
    """New content of the same size and a newer mtime, written in place: the directory's stamp
    (inode, mtime, ctime) stays as it was."""
    directory, old = path.parent.stat(), path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    assert path.stat().st_size == old.st_size
    after = path.parent.stat()
    assert (after.st_mtime_ns, after.st_ctime_ns) == (directory.st_mtime_ns, directory.st_ctime_ns)


@pytest.fixture
def file_stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every os.stat of a .bmp file made while the test runs, by any code."""
    seen: list[str] = []
    real = os.stat

    def counting(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith(".bmp"):
            seen.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting)
    yield seen


def test_plan_stats_no_file_of_an_unchanged_directory(
    tmp_path: Path, file_stats: list[str]
) -> None:
    folder = _folder(tmp_path / "data", per_class=100)
    recipe = _recipe(tmp_path, folder)
    run_recipe(recipe)
    file_stats.clear()
    assert _decision(recipe) == (False, "up to date")
    assert file_stats == []  # 300 files, 4 directories stamped, no file stat'ed
    (folder / "b" / "new.bmp").write_bytes(_bmp(7))
    listing = folder_signature(folder)
    assert (listing.files, listing.dirs_listed, listing.files_statted) == (301, 1, 101)
    assert sorted(file_stats) == sorted(str(p) for p in (folder / "b").iterdir())


def test_added_or_removed_file_reruns_the_images_stage_without_rescan(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data", per_class=3)
    recipe = _recipe(tmp_path, folder)
    run_recipe(recipe)
    (folder / "a" / "added.bmp").write_bytes(_bmp(9))
    assert _decision(recipe) == (True, "config or upstream changed")
    run_recipe(recipe)
    assert read_manifest(tmp_path / "run" / "images")["summary"]["train_images"] == 10
    (folder / "c" / "000.bmp").rename(folder / "c" / "renamed.bmp")
    assert _decision(recipe) == (True, "config or upstream changed")
    run_recipe(recipe)
    (folder / "b" / "001.bmp").unlink()
    assert _decision(recipe) == (True, "config or upstream changed")


def test_in_place_edit_is_seen_only_with_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path / "data", per_class=3)
    recipe = _recipe(tmp_path, folder)
    path = tmp_path / "imgs.yaml"
    path.write_text(recipe.to_yaml())
    run_recipe(recipe)

    def cli(*args: str) -> str:
        out = io.StringIO()
        monkeypatch.setattr(cli_module, "console", Console(file=out, width=200))
        assert cli_module.main([*args, str(path)]) == 0
        return out.getvalue()

    rescans = [["run", "--dry-run", "--rescan"], ["status", "--rescan"], ["status", "--verify"]]
    for index, command in enumerate(rescans):
        _edit_in_place(folder / "b" / f"{index:03d}.bmp")
        # Documented: by default the directory's stamp is trusted, so the edit is not seen ...
        assert _decision(recipe) == (False, "up to date")
        assert folder_signature(folder).files_statted == 0
        assert "up to date" in cli("run", "--dry-run")
        assert "stale" not in cli("status")
        # ... until a rescan stats every file; its fresh facts are cached for later plans.
        assert "config or upstream changed" in cli(*command)
        assert _decision(recipe) == (True, "config or upstream changed")
        run_recipe(recipe)
        with rescan():
            assert _decision(recipe) == (False, "up to date")


def test_a_plan_that_runs_the_stage_records_fresh_facts(tmp_path: Path) -> None:
    """An edit unseen by default is picked up when the stage runs for another reason, so a later
    `--rescan` finds the stage up to date instead of rerunning it and everything after it."""
    folder = _folder(tmp_path / "data", per_class=3)
    run_recipe(_recipe(tmp_path, folder))
    _edit_in_place(folder / "a" / "001.bmp")
    changed = _recipe(tmp_path, folder, image_size=4)  # a config change: the stage reruns
    steps = run_recipe(changed)
    assert steps[0][0].run
    with rescan():
        assert _decision(changed) == (False, "up to date")
    assert _decision(changed) == (False, "up to date")
    assert folder_signature(folder).dirs_listed == 0  # the rescan refreshed the cache
