"""Stage kind `images`: an image dataset -> normalised uint8 shards with labels, train/val split.

Sources: `builtin:digits` (scikit-learn's bundled 8x8 digits), an image folder with one
subfolder per class, or a local Hugging Face dataset directory (`datasets.save_to_disk`).

Shard format (the contract with the vae, diffusion and image_eval stages and the baselines):

    export/index.json          {"format": "image-shards/1", "shape": [C, H, W], "dtype": "uint8",
                                "normalisation": "x / 127.5 - 1", "classes": [name, ...],
                                "splits": {"train": {"count", "images_sha256", "labels_sha256"},
                                           "val": {...}}, "source": uri}
    export/train_images.npy    uint8 [N, C, H, W] (C = 1 grey or 3 RGB)
    export/train_labels.npy    int64 [N], class index into "classes"
    export/val_images.npy      export/val_labels.npy

index.json is an `ImageIndex` (data_prep/images_meta.py). Read with
`ImageShards(export_dir, "train")`, which memory-maps the arrays (`np.load(mmap_mode="r")`) and
returns float32 images in [-1, 1]. The vae stage writes latent shards in the same format with
dtype float32, normalisation "identity" and a "scaling_factor". Which split an image lands in
is a hash of (seed, image index); batches are a pure function of (seed, step, rank), so resume is
exact without loader state.

Writing streams: each image is converted and appended to its split's files as it is read
(`NpyWriter`), so memory holds one image whatever the dataset's size, and the files are byte for
byte what `np.save` of the stacked arrays gives. An image folder's data signature comes from a
cached listing that stats only the files of changed directories, every file under `--rescan`
or when a plan runs a stage (data_prep/image_listing.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from pydantic import Field

from data_prep.image_listing import folder_signature
from data_prep.image_sources import DIGITS, ImageSourceConfig, read_source, to_array
from data_prep.images_meta import UINT8_NORMALISATION, ImageIndex, ImageSplit
from data_prep.shards import SampleOrder
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.graph import rescanning
from pipeline.engine.inputs import StageSpec
from pipeline.engine.manifest import sha256_file

SPLITS = ("train", "val")
HASH_CHUNK_BYTES = 1 << 16  # re-reading a written shard holds two chunks at once


class Config(StageConfig):
    """Read an image dataset into normalised uint8 train/val shards with class labels."""

    kind: Literal["images"] = "images"
    source: ImageSourceConfig
    image_size: int | None = Field(
        None, ge=4, description="resize (centre crop to square, then resize); default: keep"
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 grey or 3 RGB; default 1 for builtin:digits, else 3"
    )
    val_fraction: float = Field(0.1, ge=0, lt=1)
    num_classes: int | None = Field(
        None, ge=1, description="expected number of classes; the data must agree"
    )

    def data_signature(self) -> dict[str, Any]:
        """A folder's file count and listing digest (data_prep/image_listing.py), or the uri;
        every file is stat'ed only under `rescan()` (`--rescan`, or a plan that runs a stage)."""
        path = Path(self.source.uri)
        if self.source.uri == DIGITS or not path.is_dir():
            return {"uri": self.source.uri}
        listing = folder_signature(path, rescan=rescanning())
        return {"files": listing.files, "listing_sha256": listing.sha256}

    def check_inputs(self) -> None:
        """The source exists, holds images and its first image decodes (one image is read)."""
        if self.source.uri != DIGITS:
            next(read_source(self.source)[1], None)


def run(ctx: StageContext) -> None:
    """Write the shards and index.json into `ctx.export_dir`."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    index = prepare_images(cfg, ctx.export_dir, seed=ctx.seed)
    train, val = index.splits["train"].count, index.splits["val"].count
    ctx.log.info(
        "%d train + %d val images of shape %s, %d classes",
        train, val, index.shape, len(index.classes),
    )  # fmt: skip
    ctx.write_summary(
        {"train_images": train, "val_images": val, "classes": len(index.classes)},
        headline="train_images",
    )


def prepare_images(cfg: Config, export_dir: Path, seed: int) -> ImageIndex:
    """Read the source, split it, and stream uint8 shards image by image; returns the index."""
    channels = cfg.channels or (1 if cfg.source.uri == DIGITS else 3)
    classes, items = read_source(cfg.source)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise PipelineError(
            f"source {cfg.source.uri}: has {len(classes)} classes, num_classes says "
            f"{cfg.num_classes}; fix num_classes or the data"
        )
    writers: dict[str, SplitWriter] = {}
    try:
        for index, (image, label, where) in enumerate(items):
            array = to_array(image, channels, cfg.image_size, where)
            if not writers:
                writers = {split: SplitWriter(export_dir, split, array.shape) for split in SPLITS}
            elif array.shape != writers["train"].shape:
                raise PipelineError(
                    f"{where}: size {array.shape[1:]} differs from the first image's "
                    f"{writers['train'].shape[1:]}; set image_size to resize every image"
                )
            split = "val" if is_val_image(index, seed, cfg.val_fraction) else "train"
            writers[split].append(array, label)
        if not writers:
            raise PipelineError(f"source {cfg.source.uri}: holds no images; add images")
        splits = {split: writers[split].close() for split in SPLITS}
    finally:
        for writer in writers.values():
            writer.abort()
    if splits["train"].count == 0:
        raise PipelineError(f"source {cfg.source.uri}: every image went to val; lower val_fraction")
    index = ImageIndex(
        shape=list(writers["train"].shape), dtype="uint8", normalisation=UINT8_NORMALISATION,
        classes=classes, splits=splits, source=cfg.source.uri,
    )  # fmt: skip
    index.write(export_dir)
    return index


def is_val_image(index: int, seed: int, val_fraction: float) -> bool:
    """Whether image `index` is held out: a hash of (seed, index) below val_fraction."""
    digest = hashlib.blake2b(f"{seed}:image:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


# ---------------------------------------------------------------------------------------------
# Sources: (class names, iterator of (image, label, where)); an image is a PIL image or an array


# ---------------------------------------------------------------------------------------------
# Writing and reading shards


def save_split(export_dir: Path, split: str, images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    """Write `<split>_images.npy` and `<split>_labels.npy`; returns the split's index entry."""
    export_dir.mkdir(parents=True, exist_ok=True)
    paths = (export_dir / f"{split}_images.npy", export_dir / f"{split}_labels.npy")
    np.save(paths[0], np.ascontiguousarray(images))
    np.save(paths[1], np.ascontiguousarray(labels, dtype=np.int64))
    return ImageSplit(
        count=len(images), images_sha256=sha256_file(paths[0]), labels_sha256=sha256_file(paths[1])
    )


class NpyWriter:
    """An .npy file written row by row; the row count goes into the header at the end.

    The bytes equal `np.save` of the stacked rows: numpy pads the header's first dimension to 21
    digits, so the header written first (0 rows) and the final one have the same length."""

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.partial = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115
        self.header_bytes = self.file.write(self._header())

    def _header(self) -> bytes:
        buffer = io.BytesIO()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        np.lib.format.write_array_header_1_0(buffer, header)
        return buffer.getvalue()

    def append(self, row: np.ndarray) -> None:
        """Write one row (shape `row_shape`) after the previous ones."""
        assert self.file is not None and row.shape == self.row_shape
        self.file.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        self.rows += 1

    def close(self) -> str:
        """Write the final header, move the file into place, and return its sha256."""
        assert self.file is not None
        header = self._header()
        assert len(header) == self.header_bytes, "npy header length changed"
        self.file.seek(0)
        self.file.write(header)
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)
        return sha256_file(self.path, chunk_bytes=HASH_CHUNK_BYTES)

    def abort(self) -> None:
        """Drop an unfinished file (no-op after close)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.partial.unlink(missing_ok=True)


class SplitWriter:
    """`<split>_images.npy` and `<split>_labels.npy`, streamed one image at a time."""

    def __init__(self, export_dir: Path, split: str, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.images = NpyWriter(export_dir / f"{split}_images.npy", "uint8", shape)
        self.labels = NpyWriter(export_dir / f"{split}_labels.npy", "<i8", ())

    def append(self, image: np.ndarray, label: int) -> None:
        self.images.append(image)
        self.labels.append(np.asarray(label))

    def close(self) -> ImageSplit:
        """Finish both files; returns the split's index entry."""
        count = self.images.rows
        return ImageSplit(
            count=count, images_sha256=self.images.close(), labels_sha256=self.labels.close()
        )

    def abort(self) -> None:
        self.images.abort()
        self.labels.abort()


class ImageShards:
    """One split of an images (or latents) export, memory-mapped; float32 batches on demand.

    `writer` is the stage kind that wrote the shards (images, or vae for latents): errors name it
    as the stage to rerun."""

    def __init__(self, export_dir: Path, split: str = "train", writer: str = "images") -> None:
        self.export_dir = Path(export_dir)
        self.index = ImageIndex.read(self.export_dir, writer)
        if split not in self.index.splits:
            raise PipelineError(f"{self.export_dir}: no split {split!r}; rerun the {writer} stage")
        self.split = split
        self.images = np.load(self.export_dir / f"{split}_images.npy", mmap_mode="r")
        self.labels = np.load(self.export_dir / f"{split}_labels.npy", mmap_mode="r")
        if list(self.images.shape[1:]) != self.index.shape or len(self.images) != len(self.labels):
            raise PipelineError(
                f"{self.export_dir}: {split} arrays disagree with index.json; rerun the {writer} "
                f"stage"
            )
        self._order = SampleOrder()

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        channels, height, width = self.index.shape
        return channels, height, width

    def __len__(self) -> int:
        return len(self.images)

    def verify(self) -> None:
        """Recompute the checksums; PipelineError when a file was modified."""
        meta = self.index.splits[self.split]
        for kind, sha256 in (("images", meta.images_sha256), ("labels", meta.labels_sha256)):
            path = self.export_dir / f"{self.split}_{kind}.npy"
            if sha256_file(path) != sha256:
                raise PipelineError(f"{path}: checksum mismatch; rerun the stage that wrote it")

    def to_float(self, raw: np.ndarray) -> np.ndarray:
        """float32 model inputs: uint8 pixels to [-1, 1]; latents as stored."""
        if self.index.normalisation == UINT8_NORMALISATION:
            return raw.astype(np.float32) / 127.5 - 1.0
        return raw.astype(np.float32)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 images [B, C, H, W], int64 labels [B]) of the given rows."""
        order = np.argsort(rows)  # memory maps read fastest in order
        images, labels = (
            np.empty((len(rows), *self.shape), np.float32),
            np.empty(len(rows), np.int64),
        )
        images[order] = self.to_float(self.images[rows[order]])
        labels[order] = self.labels[rows[order]]
        return images, labels

    def arrays(self, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first max_images (default all) images as float32 with their labels."""
        count = len(self) if max_images is None else min(max_images, len(self))
        return self.take(np.arange(count))

    def batch(
        self,
        seed: int,
        step: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        micro_step: int = 0,
        accum_steps: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One rank's micro batch of a step: a pure function of its arguments.

        Sample j of a step is global sample step * global_batch + j, taken from the epoch's
        permutation of the split; a micro batch is a contiguous block of j, so the union over
        ranks and micro steps depends only on the global batch size.
        """
        rows = self._order.rows(
            seed, step, rank, world_size, micro_batch_size, len(self), micro_step, accum_steps
        )
        return self.take(rows)


SPEC = StageSpec(Config, run, output="images")
