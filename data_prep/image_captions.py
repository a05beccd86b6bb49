"""Captions of an image source, and the caption and scene files of an images export.

An image folder holds its captions in one of two layouts (the images stage's
`source.captions` picks one, or `auto` finds it):

    sidecar    x.png beside x.txt (the same name, any image suffix): the caption, UTF-8
    metadata   metadata.jsonl at the folder's root, one {"file_name": "a/x.png", "text": "..."}
               per line, file_name relative to the folder (the Hugging Face imagefolder layout)

A captioned folder is read as every image under it (any depth; names starting with "." are
skipped) sorted by path, with one class, "image". Captions are stripped of surrounding
whitespace; an empty caption is kept: it is the empty (unconditional) caption. Every image must
have a caption and every caption an image: the pairing is checked from the folder's listing (no
image decoded) before anything runs, as is every line of metadata.jsonl; a sidecar's bytes are
read with its image, so a sidecar that is not UTF-8 stops the stage when it is reached.

The export gains, per split and in image order, `<split>_captions.jsonl` ({"text": caption} per
line) and, for `builtin:shapes`, `<split>_scenes.jsonl` (the generator's scene per line), each
with its sha256 in the split's entry of index.json. Read them with `read_captions` and
`read_scenes`, which check the checksum and the count.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from data_prep.images_meta import ImageIndex
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import sha256_file

METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
CAPTION_CLASS = "image"  # the one class of captioned data without labels
CAPTIONS, SCENES = "captions", "scenes"


@dataclass(frozen=True)
class Pairing:
    """A captioned folder's images in reading order and where each one's caption is."""

    mode: str  # sidecar | metadata
    images: list[str]  # relative POSIX paths
    captions: list[str]  # sidecar: each image's caption file; metadata: each image's caption

    def caption(self, root: Path, index: int) -> str:
        """Image `index`'s caption (a sidecar is read now)."""
        if self.mode == "sidecar":
            return read_sidecar(root / self.captions[index])
        return self.captions[index]


def folder_mode(requested: str, images: list[str], files: list[str]) -> str:
    """The caption layout a folder is read with: metadata, sidecar or none (class folders).

    auto: metadata.jsonl at the root, else sidecars if any image has a caption file, else none."""
    if requested != "auto":
        return requested
    if METADATA_FILE in files:
        return "metadata"
    stems = {_stem(name) for name in files if _is_caption_file(name) and visible(name)}
    return "sidecar" if any(_stem(image) in stems for image in images) else "none"


def refuse_stray_captions(root: Path, images: list[str], files: list[str]) -> None:
    """A one-line error for a flat folder (no image in a subfolder, so no class folders) whose
    caption files pair with no image: `auto` found no sidecar pair and would read it as class
    folders, which it cannot be; name the stray caption file instead."""
    stray = sorted(name for name in files if _is_caption_file(name) and visible(name))
    if not stray or any("/" in image for image in images):
        return
    fix = (
        f"no image has a caption file either: give each image one with its name "
        f"({_stem(images[0])}{CAPTION_SUFFIX} beside {images[0]}) and remove the rest"
        if images
        else f"nor any image: add {_stem(stray[0])}.png (or another image suffix) beside it, or "
        f"fix the path"
    )
    raise PipelineError(
        f"source {root}: caption file {stray[0]} has no image beside it{_more(stray)}; {fix}"
    )


def pair_captions(root: Path, mode: str, images: list[str], files: list[str]) -> Pairing:
    """Each image's caption by `mode` (sidecar or metadata); a one-line error for an image
    without a caption, a caption without an image, or a malformed metadata.jsonl."""
    if mode == "sidecar":
        return _pair_sidecars(root, images, files)
    if METADATA_FILE not in files:
        raise PipelineError(
            f"source {root}: no {METADATA_FILE} (captions: metadata); add one with a "
            f'{{"file_name": ..., "text": ...}} line per image, or set source.captions'
        )
    return _pair_metadata(root, images, set(files))


def _pair_sidecars(root: Path, images: list[str], files: list[str]) -> Pairing:
    captions = {_stem(name): name for name in files if _is_caption_file(name) and visible(name)}
    missing = [image for image in images if _stem(image) not in captions]
    if missing:
        raise PipelineError(
            f"source {root}: image {missing[0]} has no caption file "
            f"{_stem(missing[0])}{CAPTION_SUFFIX}{_more(missing)}; add it (an empty file is the "
            f"empty caption) or remove the image"
        )
    owners: dict[str, str] = {}
    for image in images:
        if (other := owners.setdefault(_stem(image), image)) != image:
            raise PipelineError(
                f"source {root}: images {other} and {image} share the caption file "
                f"{captions[_stem(image)]}; rename one of them and give it its own caption"
            )
    extra = sorted(name for stem, name in captions.items() if stem not in owners)
    if extra:
        raise PipelineError(
            f"source {root}: caption file {extra[0]} has no image beside it{_more(extra)}; "
            f"remove it or add its image"
        )
    return Pairing("sidecar", images, [captions[_stem(image)] for image in images])


def _pair_metadata(root: Path, images: list[str], files: set[str]) -> Pairing:
    rows = read_metadata(root / METADATA_FILE)
    wanted = set(images)
    for name, (_, line) in rows.items():
        if name not in wanted:
            problem = "is not an image in the folder" if name in files else "does not exist"
            raise PipelineError(
                f"source {root / METADATA_FILE} line {line}: file_name {name!r} {problem}; fix "
                f"the line or remove it"
            )
    missing = [image for image in images if image not in rows]
    if missing:
        raise PipelineError(
            f"source {root}: image {missing[0]} has no line in {METADATA_FILE}{_more(missing)}; "
            f'add {{"file_name": "{missing[0]}", "text": ...}} or remove the image'
        )
    return Pairing("metadata", images, [rows[image][0] for image in images])


def read_metadata(path: Path) -> dict[str, tuple[str, int]]:
    """metadata.jsonl as {file_name: (caption, line number)}; one-line errors name the line."""
    rows: dict[str, tuple[str, int]] = {}
    offset = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"source {path} line {number}"
            text = _decode(raw, f"{where}: not UTF-8", offset)
            offset += len(raw)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise PipelineError(
                    f"{where}: not JSON ({exc}); write one JSON object per line"
                ) from None
            name, caption = _metadata_row(row, where)
            if name in rows:
                raise PipelineError(
                    f"{where}: file_name {name!r} repeats line {rows[name][1]}; keep one line "
                    f"per image"
                )
            rows[name] = (caption.strip(), number)
    return rows


def _metadata_row(row: Any, where: str) -> tuple[str, str]:
    """(normalised file_name, text) of one metadata line."""
    if not isinstance(row, dict) or not all(
        isinstance(row.get(key), str) for key in ("file_name", "text")
    ):
        raise PipelineError(
            f'{where}: not an object with string "file_name" and "text"; write '
            f'{{"file_name": "a/x.png", "text": "a caption"}}'
        )
    name = PurePosixPath(row["file_name"])
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise PipelineError(
            f"{where}: file_name {row['file_name']!r} is not a path inside the folder; make it "
            f"relative to the folder that holds {METADATA_FILE}"
        )
    return name.as_posix(), row["text"]


def read_sidecar(path: Path) -> str:
    """A caption file's text (UTF-8, a BOM dropped), stripped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(
            f"source {path}: unreadable caption ({exc.strerror}); fix the file or its permissions"
        ) from None
    return _decode(data, f"source {path}: caption is not UTF-8", 0).strip()


def _decode(data: bytes, problem: str, offset: int) -> str:
    """`data` as UTF-8 (a leading BOM dropped), or an error giving the first bad byte's offset
    (`offset` is where `data` starts in its file)."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{problem} (byte offset {offset + bom + exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def _stem(name: str) -> str:
    """'a/x.png' -> 'a/x': an image and its caption file share it."""
    return str(PurePosixPath(name).with_suffix(""))


def _is_caption_file(name: str) -> bool:
    return name.lower().endswith(CAPTION_SUFFIX)


def visible(name: str) -> bool:
    """No part of the path starts with '.' (.ipynb_checkpoints, .DS_Store, ...)."""
    return not any(part.startswith(".") for part in name.split("/"))


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def caption_signature(root: Path, mode: str) -> dict[str, Any]:
    """The part of a folder's data signature its captions add: the layout, and metadata.jsonl's
    sha256 (one file, so an in-place edit is seen without a rescan). Empty for class folders, so
    their fingerprints are as before captions existed."""
    if mode == "none":
        return {}
    signature: dict[str, Any] = {"captions": mode}
    if mode == "metadata" and (root / METADATA_FILE).is_file():
        signature["metadata_sha256"] = sha256_file(root / METADATA_FILE)
    return signature


# ---------------------------------------------------------------------------------------------
# The export's caption and scene files


class JsonlWriter:
    """`<split>_<kind>.jsonl` written line by line to a partial file, moved into place on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115

    def append(self, row: dict[str, Any]) -> None:
        assert self.file is not None
        self.file.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")

    def close(self) -> str:
        """Move the file into place; returns its sha256."""
        assert self.file is not None
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)
        return sha256_file(self.path)

    def abort(self) -> None:
        """Drop an unfinished file (no-op after close)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.partial.unlink(missing_ok=True)


def split_file(export_dir: Path, split: str, kind: str) -> Path:
    """Where a split's captions or scenes are: export_dir/<split>_<kind>.jsonl."""
    return Path(export_dir) / f"{split}_{kind}.jsonl"


def read_captions(export_dir: Path, split: str = "train", writer: str = "images") -> list[str]:
    """A split's captions in image order (checksum and count checked), or a one-line error."""
    return [row["text"] for row in _read_rows(Path(export_dir), split, CAPTIONS, writer)]


def read_scenes(export_dir: Path, split: str = "train", writer: str = "images") -> list[dict]:
    """A split's scenes (builtin:shapes ground truth) in image order, as Scene.to_json() wrote
    them, or a one-line error."""
    return _read_rows(Path(export_dir), split, SCENES, writer)


def _read_rows(export_dir: Path, split: str, kind: str, writer: str) -> list[dict]:
    index = ImageIndex.read(export_dir, writer)
    if split not in index.splits:
        raise PipelineError(f"{export_dir}: no split {split!r}; rerun the {writer} stage")
    meta = index.splits[split]
    sha256 = meta.captions_sha256 if kind == CAPTIONS else meta.scenes_sha256
    if sha256 is None:
        fix = {
            CAPTIONS: "a captioned source (source.captions, source.text_field or builtin:shapes)",
            SCENES: "source builtin:shapes",
        }[kind]
        raise PipelineError(
            f"{export_dir}: the {split} split has no {kind} (source {index.source}); use {fix} "
            f"and rerun the {writer} stage"
        )
    path = split_file(export_dir, split, kind)
    if not path.is_file() or sha256_file(path) != sha256:
        problem = "checksum mismatch" if path.is_file() else "missing"
        raise PipelineError(f"{path}: {problem}; rerun the {writer} stage")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if len(rows) != meta.count:
        raise PipelineError(
            f"{path}: {len(rows)} lines for {meta.count} images; rerun the {writer} stage"
        )
    return rows
