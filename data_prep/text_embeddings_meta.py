"""The hand-off record of cached caption embeddings (meta.json) and their reader.

The text_encode stage (pipeline/stages/text_encode.py) encodes every distinct caption of an
images export once with a frozen text encoder, so a text-to-image stage, and every sweep over
its settings, reads embeddings instead of running the encoder. Captions repeat (builtin:shapes
has a few hundred over thousands of images), so the arrays hold one row per distinct caption and
each split maps its images to rows:

    export/meta.json                  TextEmbeddingsMeta (this module): encoder, shapes, counts,
                                      sha256 of every file below
    export/captions.jsonl             the distinct captions, {"text": ...} per row, in row order
                                      (first appearance: train images, then val)
    export/states.npy                 float16|float32 [U, max_length, dim]: per-token states,
                                      padded on the right (padding rows hold what the model
                                      computes there, as diffusers pipelines feed them)
    export/mask.npy                   bool [U, max_length]: True at real tokens
    export/pooled.npy                 float16|float32 [U, pooled_dim]: one vector per caption
    export/<split>_caption_ids.npy    int64 [N_split]: image i of the split -> its row
    export/empty_states.npy, empty_mask.npy, empty_pooled.npy
                                      the empty caption "" ([1, ...]): the unconditional input
                                      of classifier-free guidance

A caption that tokenizes to no token at all ("" with a tokenizer that adds none: GPT-2, Qwen2)
has an all-False mask and zero states and pooled vector. Consumers read through `TextEmbeddings`
(float32 numpy arrays), never by key; `check_images` says whether the embeddings were made from
an images export's current captions (their sha256 per split is recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from data_prep.images_meta import ImageIndex
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, read_record, sha256_file

FORMAT = "text-embeddings/1"
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.jsonl"
STATES, MASK, POOLED = "states.npy", "mask.npy", "pooled.npy"
EMPTY_PREFIX = "empty_"  # empty_states.npy, empty_mask.npy, empty_pooled.npy
WRITER = "text_encode"


def ids_file(split: str) -> str:
    """The file mapping a split's images to caption rows."""
    return f"{split}_caption_ids.npy"


class EncoderIdentity(BaseModel):
    """Which encoder made the embeddings: an upstream stage, a model directory or the builtin."""

    kind: Literal["stage", "directory", "bag-of-words"]
    name: str  # the stage's name, the directory's base name, or "bag-of-words"
    model_type: str | None = None  # config.json's model_type
    model_class: str | None = None  # the transformers class that encoded (T5EncoderModel, ...)
    layer: int | None = None  # hidden_states index; None: the model's final output


class TextEmbeddingsMeta(BaseModel):
    """Shapes, dtype, counts and checksums of a text_encode export, and what it was made from."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["text-embeddings/1"] = FORMAT
    encoder: EncoderIdentity
    dim: int  # per-token state width
    pooled_dim: int
    max_length: int  # tokens per caption (words, for bag-of-words)
    dtype: Literal["float16", "float32"]
    num_images: dict[str, int]  # images (captions) per split
    num_unique: int  # distinct captions: rows of states.npy
    num_truncated: int  # distinct captions longer than max_length, cut
    files_sha256: dict[str, str]  # every file of the export but meta.json
    images_captions_sha256: dict[str, str]  # the images export's <split>_captions.jsonl
    source: str  # the images stage's source uri

    def write(self, export_dir: Path) -> None:
        """Write export_dir/meta.json (atomically): the last file a text_encode stage writes."""
        atomic_write_json(Path(export_dir) / META_FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, export_dir: Path, writer: str = WRITER) -> TextEmbeddingsMeta:
        """The meta.json of embeddings written by a `writer` stage, or a one-line error."""
        return read_record(cls, Path(export_dir) / META_FILE, writer)


class TextEmbeddings:
    """A text_encode export, memory-mapped: float32 states, masks and pooled vectors on demand.

    `writer` is the stage kind that wrote it: errors name it as the stage to rerun."""

    def __init__(self, export_dir: Path, writer: str = WRITER) -> None:
        self.export_dir, self.writer = Path(export_dir), writer
        self.meta = meta = TextEmbeddingsMeta.read(self.export_dir, writer)
        rows, length = meta.num_unique, meta.max_length
        self._states = self._load(STATES, (rows, length, meta.dim))
        self._mask = self._load(MASK, (rows, length))
        self._pooled = self._load(POOLED, (rows, meta.pooled_dim))

    def _load(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        path = self.export_dir / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            problem = "missing" if not path.is_file() else f"unreadable ({exc})"
            raise PipelineError(f"{path}: {problem}; rerun the {self.writer} stage") from None
        if array.shape != shape:
            raise PipelineError(
                f"{path}: shape {list(array.shape)}, meta.json says {list(shape)}; rerun the "
                f"{self.writer} stage"
            )
        return array

    def __len__(self) -> int:
        return self.meta.num_unique

    def captions(self) -> list[str]:
        """The distinct captions in row order."""
        path = self.export_dir / CAPTIONS_FILE
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines]

    def caption_ids(self, split: str) -> np.ndarray:
        """int64 [N_split]: the row of each image's caption, in image order."""
        if split not in self.meta.num_images:
            raise PipelineError(
                f"{self.export_dir}: no split {split!r} (splits: {', '.join(self.meta.num_images)}); "
                f"rerun the {self.writer} stage"
            )
        ids = np.array(self._load(ids_file(split), (self.meta.num_images[split],)), np.int64)
        if len(ids) and not 0 <= ids.min() <= ids.max() < len(self):
            raise PipelineError(
                f"{self.export_dir / ids_file(split)}: rows outside 0..{len(self) - 1}; rerun the "
                f"{self.writer} stage"
            )
        return ids

    def states(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(states float32 [B, L, D], mask bool [B, L], pooled float32 [B, P]) of caption rows."""
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)  # memory maps read fastest in order
        return (
            np.asarray(self._states[unique], dtype=np.float32)[inverse],
            np.asarray(self._mask[unique], dtype=bool)[inverse],
            np.asarray(self._pooled[unique], dtype=np.float32)[inverse],
        )

    def for_images(
        self, split: str, image_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`states` of the captions of a split's images (rows of ImageShards.take)."""
        return self.states(self.caption_ids(split)[np.asarray(image_rows, dtype=np.int64)])

    def empty(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(states [1, L, D], mask [1, L], pooled [1, P]) of the empty caption "" (for CFG)."""
        meta = self.meta
        shapes = ((1, meta.max_length, meta.dim), (1, meta.max_length), (1, meta.pooled_dim))
        states, mask, pooled = (
            self._load(EMPTY_PREFIX + name, shape)
            for name, shape in zip((STATES, MASK, POOLED), shapes, strict=True)
        )
        return (
            np.asarray(states, dtype=np.float32),
            np.asarray(mask, dtype=bool),
            np.asarray(pooled, dtype=np.float32),
        )

    def verify(self) -> None:
        """Recompute every file's sha256; PipelineError naming the first file that changed."""
        for name, sha256 in self.meta.files_sha256.items():
            path = self.export_dir / name
            if not path.is_file() or sha256_file(path) != sha256:
                problem = "checksum mismatch" if path.is_file() else "missing"
                raise PipelineError(f"{path}: {problem}; rerun the {self.writer} stage")

    def check_images(self, images_dir: Path, writer: str = "images") -> None:
        """PipelineError unless these embeddings encode `images_dir`'s current captions."""
        index = ImageIndex.read(images_dir, writer)
        current = {split: entry.captions_sha256 for split, entry in index.splits.items()}
        if current != self.meta.images_captions_sha256:
            raise PipelineError(
                f"{self.export_dir}: encodes other captions than {images_dir} holds now; rerun "
                f"the {self.writer} stage"
            )
