"""Image sources in a fixed order: builtin:digits, builtin:shapes, an image folder (one
subfolder per class, or captioned: data_prep/image_captions.py), or a saved Hugging Face dataset
directory (optionally with a caption column); each image as uint8 [C, H, W] via `to_array`.

Folders and HF datasets are read lazily, one image (or one HF batch) at a time, so the images
stage holds a bounded number of decoded images whatever the dataset's size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from data_prep.image_captions import (
    CAPTION_CLASS,
    Pairing,
    caption_signature,
    folder_mode,
    pair_captions,
    refuse_stray_captions,
    visible,
)
from data_prep.image_listing import list_folder
from data_prep.sources import HF_MARKERS, UriConfig
from pipeline.engine.errors import PipelineError

DIGITS = "builtin:digits"
SHAPES = "builtin:shapes"
SHAPES_TRAIN_IMAGES, SHAPES_VAL_IMAGES, SHAPES_IMAGE_SIZE = 5000, 500, 32
DIGITS_IMAGE_SIZE = 8  # scikit-learn's digits
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HF_BATCH_ROWS = 64  # decoded images held at once
HF_LABEL_BATCH_ROWS = 65536
CaptionMode = Literal["auto", "none", "sidecar", "metadata"]


class ImageSourceConfig(UriConfig):
    """Where images come from; a bare string in YAML is the `uri`."""

    BUILTINS = (DIGITS, SHAPES)
    WHAT = "image source"

    uri: str = Field(
        description="builtin:digits, builtin:shapes, an image folder, or a saved HF dataset dir"
    )
    image_field: str = Field("image", description="HF dataset: column with the images")
    label_field: str = Field(
        "label",
        description="HF dataset: column with integer class labels (optional with text_field)",
    )
    split: str = Field("train", description="HF DatasetDict: which split to read")
    max_images: int | None = Field(
        None,
        ge=1,
        description=f"use only the first N images; builtin:shapes: N train scenes (default "
        f"{SHAPES_TRAIN_IMAGES})",
    )
    captions: CaptionMode = Field(
        "auto",
        description="image folder: where captions are. sidecar: x.txt (UTF-8) beside each "
        "image x.png; metadata: metadata.jsonl at the root, a {file_name (relative to the "
        "folder), text} line per image; none: no captions, one subfolder per class; auto: "
        "metadata if metadata.jsonl exists, else sidecar if any image has an x.txt, else none. "
        "A captioned folder is every image under it with one class, 'image'; an empty caption "
        "is kept (the unconditional caption)",
    )
    text_field: str | None = Field(
        None,
        description="HF dataset: column with captions (strings); then label_field is used "
        "when that column exists, else every image has the one class 'image'",
    )
    val_images: int | None = Field(
        None,
        ge=1,
        description=f"builtin:shapes: held-out scenes, from the generator's test split "
        f"(default {SHAPES_VAL_IMAGES}); they are the val split, val_fraction is not used",
    )

    @field_validator("val_images")
    @classmethod
    def _shapes_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("uri") != SHAPES:
            raise ValueError(
                "only builtin:shapes has a held-out split of its own; use val_fraction"
            )
        return value

    @model_serializer(mode="wrap")
    def _without_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The fields, less the caption and shapes options at their defaults: they came after
        runs existed, and a stage's fingerprint hashes its config, so images stages made before
        them keep their fingerprints (and what is downstream of them is not trained again)."""
        data = handler(self)
        for name in ("captions", "text_field", "val_images"):
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data


class Item(NamedTuple):
    """One image of a source, where it came from (for errors) and what goes with it."""

    image: Any  # a PIL image or a uint8 array
    label: int
    where: str
    caption: str | None = None
    scene: dict[str, Any] | None = None  # builtin:shapes: the scene's ground truth
    split: str | None = None  # builtin:shapes: set by the generator; else the stage's hash split


@dataclass(frozen=True)
class Source:
    """A source's class names and its images in order; whether they carry captions and scenes."""

    classes: list[str]
    items: Iterator[Item]
    captioned: bool = False
    scenes: bool = False


def read_items(source: ImageSourceConfig, image_size: int | None = None, seed: int = 0) -> Source:
    """The classes and images (with captions, if any) of a source, in a fixed order, at most
    max_images; a captioned folder's pairing is checked here, before any image is read.

    `image_size` and `seed` are what builtin:shapes renders and draws its scenes with."""
    path = Path(source.uri)
    if source.uri not in (DIGITS, SHAPES) and not path.exists():
        raise PipelineError(f"source {source.uri}: no such image folder; check the path")
    folder = path.is_dir() and not any((path / marker).is_file() for marker in HF_MARKERS)
    if source.captions in ("sidecar", "metadata") and not folder:
        raise PipelineError(
            f"source {source.uri}: captions: {source.captions} is for an image folder; remove "
            f"it (an HF dataset's captions are a column: set source.text_field)"
        )
    if source.uri == SHAPES:
        return _shapes(source, image_size or SHAPES_IMAGE_SIZE, seed)
    if source.uri == DIGITS:
        data = _digits()
    elif path.is_dir() and not folder:
        data = _hf_dataset(path, source)
    elif folder:
        data = _folder(path, source)
    else:
        raise PipelineError(
            f"source {source.uri}: not a folder; point it at a folder with one subfolder per "
            f"class or with captions, or at a saved HF dataset"
        )
    return replace(data, items=_take(data.items, source.max_images))


def read_source(source: ImageSourceConfig) -> tuple[list[str], Iterator[tuple[Any, int, str]]]:
    """Class names and the (image, label, where) of a source, captions left out."""
    data = read_items(source)
    return data.classes, ((item.image, item.label, item.where) for item in data.items)


def source_signature(source: ImageSourceConfig, rescan: bool = False) -> dict[str, Any]:
    """A folder's (or saved HF dataset's) file count and listing digest (data_prep/
    image_listing.py), which cover caption files as they cover images, and what its captions
    add (image_captions.caption_signature); the uri of a builtin."""
    path = Path(source.uri)
    if source.uri in (DIGITS, SHAPES) or not path.is_dir():
        return {"uri": source.uri}
    listing, files = list_folder(path, rescan=rescan)
    mode = folder_mode(source.captions, folder_images(files), files)
    signature = {"files": listing.files, "listing_sha256": listing.sha256}
    return {**signature, **caption_signature(path, mode)}


def _take(items: Iterator[Item], limit: int | None) -> Iterator[Item]:
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item


def _digits() -> Source:
    """scikit-learn's 1797 bundled 8x8 digits; pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
    items = (Item(pixels[i], int(digits.target[i]), f"digits #{i}") for i in range(len(pixels)))
    return Source([str(name) for name in digits.target_names], items)


def _shapes(source: ImageSourceConfig, size: int, seed: int) -> Source:
    """Captioned scenes of data_prep/shapes.py, labelled by category: max_images from the
    generator's train split, then val_images from its test split (the held-out combinations)."""
    from data_prep import shapes  # imported when used, as scikit-learn is for digits

    counts = {
        "train": source.max_images or SHAPES_TRAIN_IMAGES,
        "test": source.val_images or SHAPES_VAL_IMAGES,
    }

    def items() -> Iterator[Item]:
        for generator_split, split in (("train", "train"), ("test", "val")):
            drawn = shapes.scenes(generator_split, counts[generator_split], seed)
            for i, scene in enumerate(drawn):
                yield Item(
                    shapes.render(scene, size), shapes.CATEGORIES.index(scene.category),
                    f"builtin:shapes {generator_split} scene {i}", scene.caption, scene.to_json(),
                    split,
                )  # fmt: skip

    return Source(list(shapes.CATEGORIES), items(), captioned=True, scenes=True)


def _folder(path: Path, source: ImageSourceConfig) -> Source:
    """An image folder: captioned (data_prep/image_captions.py) or one subfolder per class."""
    _, files = list_folder(path)  # names only: the cached listing is right about them
    images = folder_images(files)
    mode = folder_mode(source.captions, images, files)
    if mode == "none":
        if source.captions == "auto":
            refuse_stray_captions(path, images, files)
        return _class_folders(path)
    if not images:
        raise PipelineError(
            f"source {path}: no images found (captions: {mode}, any "
            f"{'/'.join(IMAGE_SUFFIXES)} file under the folder); add images or fix the path"
        )
    pairing = pair_captions(path, mode, images, files)
    return Source([CAPTION_CLASS], _captioned_items(path, pairing), captioned=True)


def folder_images(files: list[str]) -> list[str]:
    """The image files among a folder's relative paths, hidden ones left out, sorted by path."""
    images = (f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted((f for f in images if visible(f)), key=lambda f: f.split("/"))


def _captioned_items(path: Path, pairing: Pairing) -> Iterator[Item]:
    for index, name in enumerate(pairing.images):
        caption = pairing.caption(path, index)
        yield Item(_open_image(path / name), 0, str(path / name), caption)


def _class_folders(path: Path) -> Source:
    """Class = subfolder name (sorted); images sorted by path, one class at a time (only one
    class's file names are held)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [next(_image_files(path / name), None) is not None for name in classes]
    if not any(found):
        raise PipelineError(
            f"source {path}: no images found (expected one subfolder per class holding "
            f"{'/'.join(IMAGE_SUFFIXES)} files, or captioned images); add images or fix the path"
        )
    if not all(found):
        raise PipelineError(
            f"source {path}: class folder {classes[found.index(False)]!r} has no images; add "
            f"images or remove it"
        )
    return Source(classes, _folder_items(path, classes))


def _image_files(folder: Path) -> Iterator[Path]:
    """The image files under one class folder, in directory order."""
    return (f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _folder_items(path: Path, classes: list[str]) -> Iterator[Item]:
    for label, name in enumerate(classes):
        for file in sorted(_image_files(path / name)):
            yield Item(_open_image(file), label, str(file))


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


def _hf_dataset(path: Path, source: ImageSourceConfig) -> Source:
    """A saved HF dataset: images from image_field, labels from label_field (ClassLabel names),
    captions from text_field when set (then a dataset without label_field has one class).

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
    for field in (source.image_field, source.text_field or source.label_field):
        if field not in loaded.column_names:
            raise PipelineError(
                f"source {path}: no column {field!r} (columns: {', '.join(loaded.column_names)}); "
                f"set source.image_field / source.label_field / source.text_field"
            )
    text = loaded.features[source.text_field] if source.text_field else None
    if text is not None and getattr(text, "dtype", None) not in ("string", "large_string"):
        raise PipelineError(
            f"source {path}: column {source.text_field!r} holds {text}, not strings; set "
            f"source.text_field to the caption column"
        )
    if source.label_field not in loaded.column_names:
        return Source([CAPTION_CLASS], _hf_items(loaded, source, None, path), captioned=True)
    feature = loaded.features[source.label_field]
    if isinstance(feature, datasets.ClassLabel):
        classes, mapping = list(feature.names), {i: i for i in range(len(feature.names))}
    else:
        values = sorted(_label_values(loaded, source.label_field, path))
        classes, mapping = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    items = _hf_items(loaded, source, mapping, path)
    return Source(classes, items, captioned=text is not None)


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
    loaded: Any, source: ImageSourceConfig, mapping: dict[int, int] | None, path: Path
) -> Iterator[Item]:
    """The rows in order; label 0 for all when `mapping` is None (no label column)."""
    image_field, text_field = source.image_field, source.text_field
    label_field = source.label_field if mapping is not None else None
    columns = [name for name in (image_field, label_field, text_field) if name is not None]
    rows = loaded.select_columns(list(dict.fromkeys(columns)))
    index = 0
    for batch in rows.iter(batch_size=HF_BATCH_ROWS):
        count = len(batch[image_field])
        labels = batch[label_field] if label_field else [0] * count
        texts = batch[text_field] if text_field else [None] * count
        for image, label, text in zip(batch[image_field], labels, texts, strict=True):
            where = f"source {path} row {index}"
            if mapping is not None and label not in mapping:
                raise PipelineError(
                    f"{where}: label {label!r} is not one of the {len(mapping)} classes; fix "
                    f"the row or drop it"
                )
            if text_field and text is None:
                raise PipelineError(
                    f"{where}: column {text_field!r} is empty (None); give the row a caption "
                    f'("" is the empty caption) or drop it'
                )
            caption = text.strip() if text_field else None
            yield Item(image, 0 if mapping is None else mapping[label], where, caption)
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
