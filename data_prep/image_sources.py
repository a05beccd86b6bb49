"""Image sources in a fixed order: builtin:digits, an image folder with one subfolder per class,
or a saved Hugging Face dataset directory; each image as uint8 [C, H, W] via `to_array`.

Folders and HF datasets are read lazily, one image (or one HF batch) at a time, so the images
stage holds a bounded number of decoded images whatever the dataset's size."""

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
HF_BATCH_ROWS = 64  # decoded images held at once
HF_LABEL_BATCH_ROWS = 65536


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
    """An image folder: class = subfolder name (sorted); images sorted by path, one class at a
    time (only one class's file names are held)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [next(_image_files(path / name), None) is not None for name in classes]
    if not any(found):
        raise PipelineError(
            f"source {path}: no images found (expected one subfolder per class holding "
            f"{'/'.join(IMAGE_SUFFIXES)} files); add images or fix the path"
        )
    if not all(found):
        raise PipelineError(
            f"source {path}: class folder {classes[found.index(False)]!r} has no images; add "
            f"images or remove it"
        )
    return classes, _folder_items(path, classes)


def _image_files(folder: Path) -> Iterator[Path]:
    """The image files under one class folder, in directory order."""
    return (f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _folder_items(path: Path, classes: list[str]) -> Iterator[Item]:
    for label, name in enumerate(classes):
        for file in sorted(_image_files(path / name)):
            yield _open_image(file), label, str(file)


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
    """A saved HF dataset: images from image_field, labels from label_field (ClassLabel names).

    The dataset stays memory-mapped Arrow; rows are decoded HF_BATCH_ROWS at a time."""
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
    if isinstance(feature, datasets.ClassLabel):
        classes, mapping = list(feature.names), {i: i for i in range(len(feature.names))}
    else:
        values = sorted(_label_values(loaded, source.label_field, path))
        classes, mapping = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    return classes, _hf_items(loaded, source, mapping, path)


def _label_values(loaded: Any, field: str, path: Path) -> set[int]:
    """The distinct integer labels of a column, read a batch at a time."""
    values: set[int] = set()
    for batch in loaded.select_columns([field]).iter(batch_size=HF_LABEL_BATCH_ROWS):
        if not all(isinstance(v, int) for v in batch[field]):
            raise PipelineError(
                f"source {path}: column {field!r} must hold integer class labels; "
                f"cast it to a ClassLabel"
            )
        values.update(batch[field])
    return values


def _hf_items(
    loaded: Any, source: ImageSourceConfig, mapping: dict[int, int], path: Path
) -> Iterator[Item]:
    image_field, label_field = source.image_field, source.label_field
    rows = loaded.select_columns(list(dict.fromkeys([image_field, label_field])))
    index = 0
    for batch in rows.iter(batch_size=HF_BATCH_ROWS):
        for image, label in zip(batch[image_field], batch[label_field], strict=True):
            if label not in mapping:
                raise PipelineError(
                    f"source {path} row {index}: label {label!r} is not one of the "
                    f"{len(mapping)} classes; fix the row or drop it"
                )
            yield image, mapping[label], f"source {path} row {index}"
            index += 1


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
