"""Stage kind `images`: an image dataset -> normalised uint8 shards with labels (and captions),
train/val split.

Sources: `builtin:digits` (scikit-learn's bundled 8x8 digits), `builtin:shapes` (captioned
scenes of data_prep/shapes.py; val is the generator's compositional test split), an image folder
with one subfolder per class or with captions (x.txt sidecars or a metadata.jsonl), or a local
Hugging Face dataset directory (`datasets.save_to_disk`), optionally with a caption column.

Shard format (the contract with the vae, diffusion and image_eval stages and the baselines):

    export/index.json          {"format": "image-shards/1", "shape": [C, H, W], "dtype": "uint8",
                                "normalisation": "x / 127.5 - 1", "classes": [name, ...],
                                "splits": {"train": {"count", "images_sha256", "labels_sha256"},
                                           "val": {...}}, "source": uri}
    export/train_images.npy    uint8 [N, C, H, W] (C = 1 grey or 3 RGB)
    export/train_labels.npy    int64 [N], class index into "classes"
    export/val_images.npy      export/val_labels.npy
    export/train_captions.jsonl  {"text": caption} per image, in image order (captioned sources;
                               "captions_sha256" in the split's entry), read by `read_captions`
    export/train_scenes.jsonl  builtin:shapes: each image's scene (ground truth, "scenes_sha256")

index.json is an `ImageIndex` (data_prep/images_meta.py). Read with
`ImageShards(export_dir, "train")`, which memory-maps the arrays (`np.load(mmap_mode="r")`) and
returns float32 images in [-1, 1]. The vae stage writes latent shards in the same format with
dtype float32, normalisation "identity" and a "scaling_factor". Which split an image lands in
is a hash of (seed, image index) (builtin:shapes: the generator's split); batches are a pure
function of (seed, step, rank), so resume is exact without loader state.

Writing streams: each image is converted and appended to its split's files as it is read
(`data_prep.npy_writer.NpyWriter`), so memory holds one image whatever the dataset's size, and
the files are byte for byte what `np.save` of the stacked arrays gives. An image folder's data
signature comes from a cached listing that stats only the files of changed directories, every
file under `--rescan` or when a plan runs a stage (data_prep/image_listing.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from data_prep.image_captions import CAPTIONS, SCENES, JsonlWriter, read_captions, split_file
from data_prep.image_sources import (
    DIGITS,
    DIGITS_IMAGE_SIZE,
    SHAPES,
    SHAPES_IMAGE_SIZE,
    ImageSourceConfig,
    Item,
    read_items,
    source_signature,
    to_array,
)
from data_prep.images_meta import UINT8_NORMALISATION, ImageIndex, ImageSplit
from data_prep.npy_writer import NpyWriter
from data_prep.shards import SampleOrder
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.graph import rescanning
from pipeline.engine.inputs import StageSpec
from pipeline.engine.manifest import sha256_file

if TYPE_CHECKING:
    from pipeline.engine.inputs import Resolved

SPLITS = ("train", "val")
VAL_FRACTION = 0.1


class Config(StageConfig):
    """Read an image dataset into normalised uint8 train/val shards with class labels."""

    kind: Literal["images"] = "images"
    source: ImageSourceConfig
    image_size: int | None = Field(
        None,
        ge=4,
        description="resize (centre crop to square, then resize); default: keep "
        "(builtin:shapes renders at this size, default 32)",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 grey or 3 RGB; default 1 for builtin:digits, else 3"
    )
    val_fraction: float = Field(
        VAL_FRACTION,
        ge=0,
        lt=1,
        description="share of images held out as val (a hash of seed and image index); not "
        "for builtin:shapes, whose val is the generator's test split (source.val_images)",
    )
    num_classes: int | None = Field(
        None, ge=1, description="expected number of classes; the data must agree"
    )

    @field_validator("val_fraction")
    @classmethod
    def _not_for_shapes(cls, value: float, info: ValidationInfo) -> float:
        source = info.data.get("source")  # the default is accepted: resolved recipes list it
        if source is not None and source.uri == SHAPES and value != VAL_FRACTION:
            raise ValueError(
                "builtin:shapes holds out the generator's test split; set source.val_images"
            )
        return value

    def data_signature(self) -> dict[str, Any]:
        """A folder's listing digest, caption files included, and its metadata.jsonl's sha256
        (image_sources.source_signature), or the uri; every file is stat'ed only under
        `rescan()` (`--rescan`, or a plan that runs a stage)."""
        return source_signature(self.source, rescan=rescanning())

    def check_inputs(self) -> None:
        """The source exists and holds images, a captioned folder's captions pair with its
        images (from its listing, every metadata.jsonl line parsed), and its first image and
        caption decode (one image is read or rendered)."""
        if self.source.uri != DIGITS:
            next(read_items(self.source, self.image_size).items, None)


def planned_size(images: Resolved | None) -> tuple[int, str] | None:
    """The side of the square images an images input holds, where its recipe fixes it (the
    stage's image_size, or a built-in source's own size), and where that comes from, for
    messages; None for a folder or dataset of its own sizes, or a directory given by path."""
    cfg = images.config if images is not None else None
    if not isinstance(cfg, Config):
        return None
    if cfg.image_size is not None:
        return cfg.image_size, f"the {images.stage} stage's image_size"
    size = {DIGITS: DIGITS_IMAGE_SIZE, SHAPES: SHAPES_IMAGE_SIZE}.get(cfg.source.uri)
    return (size, f"the {images.stage} stage's {cfg.source.uri} images") if size else None


def run(ctx: StageContext) -> None:
    """Write the shards and index.json into `ctx.export_dir`."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    index = prepare_images(cfg, ctx.export_dir, seed=ctx.seed)
    train, val = index.splits["train"].count, index.splits["val"].count
    ctx.log.info(
        "%d train + %d val images of shape %s, %d classes%s",
        train, val, index.shape, len(index.classes), ", with captions" * index.captioned,
    )  # fmt: skip
    ctx.write_summary(
        {"train_images": train, "val_images": val, "classes": len(index.classes)},
        headline="train_images",
    )


def prepare_images(cfg: Config, export_dir: Path, seed: int) -> ImageIndex:
    """Read the source, split it, and stream uint8 shards image by image; returns the index."""
    channels = cfg.channels or (1 if cfg.source.uri == DIGITS else 3)
    source = read_items(cfg.source, cfg.image_size, seed)
    classes = source.classes
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise PipelineError(
            f"source {cfg.source.uri}: has {len(classes)} classes, num_classes says "
            f"{cfg.num_classes}; fix num_classes or the data"
        )
    writers: dict[str, SplitWriter] = {}
    try:
        for index, item in enumerate(source.items):
            array = to_array(item.image, channels, cfg.image_size, item.where)
            if not writers:
                kinds = (source.captioned, source.scenes)  # which .jsonl files go beside
                writers = {
                    split: SplitWriter(export_dir, split, array.shape, *kinds) for split in SPLITS
                }
            elif array.shape != writers["train"].shape:
                raise PipelineError(
                    f"{item.where}: size {array.shape[1:]} differs from the first image's "
                    f"{writers['train'].shape[1:]}; set image_size to resize every image"
                )
            held_out = is_val_image(index, seed, cfg.val_fraction)
            split = item.split or ("val" if held_out else "train")
            writers[split].append(array, item)
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


class SplitWriter:
    """`<split>_images.npy` and `<split>_labels.npy`, and `<split>_captions.jsonl` and
    `<split>_scenes.jsonl` when the source has them, streamed one image at a time."""

    def __init__(
        self,
        export_dir: Path,
        split: str,
        shape: tuple[int, ...],
        captions: bool = False,
        scenes: bool = False,
    ) -> None:
        self.shape = shape
        self.images = NpyWriter(export_dir / f"{split}_images.npy", "uint8", shape)
        self.labels = NpyWriter(export_dir / f"{split}_labels.npy", "<i8", ())
        kinds = [kind for kind, wanted in ((CAPTIONS, captions), (SCENES, scenes)) if wanted]
        self.rows = {kind: JsonlWriter(split_file(export_dir, split, kind)) for kind in kinds}

    def append(self, image: np.ndarray, item: Item) -> None:
        self.images.append(image)
        self.labels.append(np.asarray(item.label))
        if CAPTIONS in self.rows:
            self.rows[CAPTIONS].append({"text": item.caption})
        if SCENES in self.rows:
            self.rows[SCENES].append(item.scene)

    def close(self) -> ImageSplit:
        """Finish every file; returns the split's index entry."""
        rows = {f"{kind}_sha256": writer.close() for kind, writer in self.rows.items()}
        return ImageSplit(
            count=self.images.rows,
            images_sha256=self.images.close(),
            labels_sha256=self.labels.close(),
            **rows,
        )

    def abort(self) -> None:
        for writer in (self.images, self.labels, *self.rows.values()):
            writer.abort()


class ImageShards:
    """One split of an images (or latents) export, memory-mapped; float32 batches on demand.

    `writer` is the stage kind that wrote the shards (images, or vae for latents): errors name it
    as the stage to rerun."""

    def __init__(self, export_dir: Path, split: str = "train", writer: str = "images") -> None:
        self.export_dir, self.writer = Path(export_dir), writer
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
        """Recompute the checksums (captions and scenes too, where written); PipelineError when
        a file was modified."""
        meta = self.index.splits[self.split]
        files = [
            (self.export_dir / f"{self.split}_images.npy", meta.images_sha256),
            (self.export_dir / f"{self.split}_labels.npy", meta.labels_sha256),
            (split_file(self.export_dir, self.split, CAPTIONS), meta.captions_sha256),
            (split_file(self.export_dir, self.split, SCENES), meta.scenes_sha256),
        ]
        for path, sha256 in files:
            if sha256 is not None and sha256_file(path) != sha256:
                raise PipelineError(f"{path}: checksum mismatch; rerun the stage that wrote it")

    def relabel(self, labels: np.ndarray) -> None:
        """Batches carry `labels` (one per image: a text model's caption rows) for the classes."""
        if len(labels) != len(self.images):
            raise PipelineError(
                f"{self.export_dir}: {len(labels)} labels for {len(self.images)} {self.split} "
                f"images; rerun the stage that made the labels"
            )
        self.labels = labels

    def captions(self) -> list[str]:
        """This split's captions in image order (data_prep/image_captions.py: read_captions)."""
        return read_captions(self.export_dir, self.split, self.writer)

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
