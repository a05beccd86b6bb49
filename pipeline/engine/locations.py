"""External inputs: a model or tokenizer directory the user has (a Hugging Face checkpoint on disk).

A directory is checked before anything runs (exists, is a model or tokenizer directory, needs no
remote code) and fingerprinted by its content: the small JSON and tokenizer files are hashed, the
weight files are taken by size and modification time (hashing gigabytes on every plan would
cost more than the check is worth), so a changed model reruns what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.engine.config import Strict
from pipeline.engine.schema_errors import PathText

LocationKind = Literal["model", "tokenizer"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# Every file a tokenizer is made of (what a tokenizer location's fingerprint covers).
TOKENIZER_ALL_FILES = (
    *TOKENIZER_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


class Location(Strict):
    """A directory on disk (or a hub id `org/name` where a network is available)."""

    path: PathText = Field(description="a local Hugging Face directory, or a hub id org/name")

    def resolved(self) -> Path:
        return Path(self.path).expanduser().absolute()


def location_problem(location: Location, kind: LocationKind, where: str) -> str | None:
    """One line saying why `location` cannot serve as a `kind` directory, or None."""
    path = location.resolved()
    shown = f"{where}.path {location.path}"
    if not path.exists():
        return f"{shown}: no such directory; give the folder that holds config.json" + (
            " (hub ids are not downloaded here: download it first, e.g. `hf download "
            f"{location.path} --local-dir DIR`)"
            if _looks_like_hub_id(location.path)
            else ""
        )
    if not path.is_dir():
        return f"{shown}: is a file, not a directory; give the folder that holds it"
    if kind == "tokenizer":
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            names = ", ".join(TOKENIZER_FILES)
            return f"{shown}: no tokenizer files ({names}); give a model or tokenizer directory"
        return None
    config_file = path / "config.json"
    if not config_file.is_file():
        return f"{shown}: no config.json, not a Hugging Face model directory; give the folder with config.json and the weights"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{shown}: config.json is not valid JSON ({exc}); fix or re-download it"
    if not isinstance(config, dict) or "model_type" not in config:
        return f"{shown}: config.json has no model_type; re-download the model"
    if config.get("auto_map"):
        return (
            f"{shown}: the model needs trust_remote_code (its config.json has auto_map), which "
            f"this pipeline does not run; use a model whose architecture transformers ships"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
        return f"{shown}: no weight files (*.safetensors or *.bin); the download is incomplete"
    return None


def _looks_like_hub_id(text: str) -> bool:
    return re.match(HUB_ID, text) is not None and not Path(text).expanduser().is_absolute()


def location_signature(location: Location, kind: LocationKind = "model") -> dict[str, Any]:
    """What a fingerprint holds of a directory: a hash of its small files, weights by size+mtime.

    A tokenizer location covers its tokenizer files only: retraining the model of a directory
    whose tokenizer stays the same does not re-encode the data.
    """
    path = location.resolved()
    if not path.is_dir():
        return {"path": str(path), "missing": True}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:  # .cache/, .git/: not part of the model
            continue
        if kind == "tokenizer" and rel not in TOKENIZER_ALL_FILES:
            continue
        stat = file.stat()
        digest.update(rel.encode() + b"\0")
        if file.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(file.read_bytes())
    return {"path": str(path), "content": digest.hexdigest()[:16]}
