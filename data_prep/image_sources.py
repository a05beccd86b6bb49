"""Image sources in a fixed order: builtin:digits, an image folder with one subfolder per class,
or a saved Hugging Face dataset directory; each image as uint8 [C, H, W] via `to_array`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from data_prep.sources import HF_MARKERS, UriConfig
from pipeline.engine.errors import PipelineError

DIGITS = "builtin:digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageSourceConfig(UriConfig):
    """Where images come from; a bare string in YAML is the `uri`."""

    BUILTINS = (DIGITS,)
    WHAT = "image source"

    uri: str = Field(description="builtin:digits, an image folder, or a saved HF dataset dir")
    image_field: str = Field("image", description="HF dataset: column with the images")
    label_field: str = Field("label", description="HF dataset: column with integer class labels")
    split: str = Field("train", description="HF DatasetDict: which split to read")
    max_images: int | None = Field(None, ge=1, description="use only the first N images")


Item = tuple[Any, int, str]


def read_source(source: ImageSourceConfig) -> tuple[list[str], Iterator[Item]]:
    """Class names and the images of a source, in a fixed order, at most max_images."""
    path = Path(source.uri)
    if source.uri == DIGITS:
        classes, items = _digits()
    elif not path.exists():
        raise PipelineError(f"source {source.uri}: no such image folder; check the path")
    elif path.is_dir() and any((path / marker).is_file() for marker in HF_MARKERS):
        classes, items = _hf_dataset(path, source)
    elif path.is_dir():
        classes, items = _folder(path)
    else:
        raise PipelineError(
            f"source {source.uri}: not a folder; point it at a folder with one subfolder per "
            f"class, or at a saved HF dataset"
        )
    return classes, _take(items, source.max_images)


def _take(items: Iterator[Item], limit: int | None) -> Iterator[Item]:
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item


def _digits() -> tuple[list[str], Iterator[Item]]:
    """scikit-learn's 1797 bundled 8x8 digits; pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    items = ((pixels[i], int(digits.target[i]), f"digits #{i}") for i in range(len(pixels)))
    return [str(name) for name in digits.target_names], items


def _folder(path: Path) -> tuple[list[str], Iterator[Item]]:
    """An image folder: class = subfolder name (sorted); images sorted by path."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (file, label)
        for label, name in enumerate(classes)
        for file in sorted((path / name).rglob("*"))
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not classes or not files:
        raise PipelineError(
            f"source {path}: no images found (expected one subfolder per class holding "
            f"{'/'.join(IMAGE_SUFFIXES)} files); add images or fix the path"
        )
    empty = sorted(set(classes) - {classes[label] for _, label in files})
    if empty:
        raise PipelineError(
            f"source {path}: class folder {empty[0]!r} has no images; add images or remove it"
        )
    return classes, ((_open_image(file), label, str(file)) for file, label in files)


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise PipelineError(
            f"source {path}: unreadable image ({exc}); delete or replace the file"
        ) from None


def _hf_dataset(path: Path, source: ImageSourceConfig) -> tuple[list[str], Iterator[Item]]:
    """A saved HF dataset: images from image_field, labels from label_field (ClassLabel names)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise PipelineError(
                f"source {path}: no split {source.split!r} (splits: {', '.join(loaded)}); "
                f"set source.split"
            )
        loaded = loaded[source.split]
    for field in (source.image_field, source.label_field):
        if field not in loaded.column_names:
            raise PipelineError(
                f"source {path}: no column {field!r} (columns: {', '.join(loaded.column_names)}); "
                f"set source.image_field / source.label_field"
            )
    feature = loaded.features[source.label_field]
    raw_labels = loaded[source.label_field]
    if isinstance(feature, datasets.ClassLabel):
        classes, mapping = list(feature.names), {i: i for i in range(len(feature.names))}
    else:
        if not all(isinstance(v, int) for v in raw_labels):
            raise PipelineError(
                f"source {path}: column {source.label_field!r} must hold integer class labels; "
                f"cast it to a ClassLabel"
            )
        values = sorted(set(raw_labels))
        classes, mapping = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    column = loaded.select_columns([source.image_field])
    items = (
        (row[source.image_field], mapping[raw_labels[i]], f"source {path} row {i}")
        for i, row in enumerate(column)
    )
    return classes, items


def to_array(image: Any, channels: int, size: int | None, where: str) -> np.ndarray:
    """uint8 [C, H, W] from a PIL image or an array, converted to grey/RGB and resized."""
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise PipelineError(f"{where}: image array of dtype {array.dtype}; store uint8 pixels")
        image = Image.fromarray(array)
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
