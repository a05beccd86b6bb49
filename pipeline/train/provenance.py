"""Where a checkpoint or an export came from: the stage config, the code version, the packages.

Every checkpoint's meta.json and every export's provenance.json carry it, so a model found later
can be traced to the configuration, code and libraries that made it. It is read from package
metadata and one git call per process, never from the environment (no variables, no secrets).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"
PROJECT = "pretrain-pipeline"  # the distribution name in pyproject.toml
PACKAGES = (
    "torch", "transformers", "accelerate", "deepspeed", "trl", "diffusers", "datasets",
    "tokenizers", "safetensors",
)  # fmt: skip
GIT_TIMEOUT_S = 2.0  # a hung git (network filesystem) must not stall a checkpoint
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding pipeline/


def provenance(config: dict[str, Any] | None) -> dict[str, Any]:
    """The record written with a checkpoint or export: config (JSON form), code, packages."""
    return {"config": config, "code": code_version(), "packages": package_versions()}


def write_provenance(directory: Path, config: dict[str, Any] | None) -> Path:
    """Write provenance.json into `directory` (an export being assembled)."""
    path = directory / PROVENANCE_FILE
    path.write_text(json.dumps(provenance(config), indent=1, sort_keys=True) + "\n")
    return path


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The package version, plus the git commit and dirty flag when run from a git checkout."""
    return {"package": PROJECT, "version": _version(PROJECT), **_git_state(SOURCE_ROOT)}


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Python's and the key libraries' versions (None: not installed); no library is imported."""
    return {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git_state(root: Path) -> dict[str, Any]:
    """{git_commit, git_dirty} of the checkout at `root`; empty when git or the checkout is absent."""
    # No optional locks: `git status` must not take the index lock from a user's own git command.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, env=env, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        # An installed copy inside some other repository must not report that repository.
        if Path(top).resolve() != root:
            return {}
        dirty = bool(git("status", "--porcelain"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}
