"""Image data prep: shard format, exact batches, folder and HF sources, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.images import Config, ImageShards, prepare_images
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import sha256_file
from tests.helpers import cli, write_recipe


def _prepare(tmp_path: Path, seed: int = 0, **config: object) -> Path:
    out = tmp_path / f"export_{seed}"
    prepare_images(Config.model_validate({"kind": "images", **config}), out, seed=seed)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("digits"), source="builtin:digits")


def test_digits_shards_follow_the_documented_format(digits: Path) -> None:
    import json

    index = json.loads((digits / "index.json").read_text())
    assert index["shape"] == [1, 8, 8] and index["dtype"] == "uint8"
    assert index["classes"] == [str(i) for i in range(10)]
    counts = {split: index["splits"][split]["count"] for split in ("train", "val")}
    assert counts["train"] + counts["val"] == 1797 and 120 < counts["val"] < 240
    for split in ("train", "val"):
        images = np.load(digits / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(digits / f"{split}_labels.npy", mmap_mode="r")
        assert images.dtype == np.uint8 and images.shape == (counts[split], 1, 8, 8)
        assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
        meta = index["splits"][split]
        assert sha256_file(digits / f"{split}_images.npy") == meta["images_sha256"]
    shards = ImageShards(digits, "train")
    assert isinstance(shards.images, np.memmap)
    images, labels = shards.arrays()
    assert images.dtype == np.float32 and images.min() == -1.0 and images.max() == 1.0
    from sklearn.datasets import load_digits

    from data_prep.images import is_val_image

    # Pixels 0..16 become uint8 0..255, read back as x / 127.5 - 1.
    reference = load_digits().images
    first = next(i for i in range(len(reference)) if not is_val_image(i, 0, 0.1))
    expected = np.rint(reference[first] * 255 / 16) / 127.5 - 1
    assert np.allclose(images[0, 0], expected, atol=1e-6)


def test_verify_detects_a_modified_shard(tmp_path: Path, digits: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    ImageShards(copy, "train").verify()
    path = copy / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="checksum mismatch"):
        ImageShards(copy, "train").verify()


def test_split_is_a_function_of_the_seed(tmp_path: Path, digits: Path) -> None:
    again = _prepare(tmp_path, seed=0, source="builtin:digits")
    other = _prepare(tmp_path, seed=1, source="builtin:digits")
    same = np.array_equal(np.load(again / "val_labels.npy"), np.load(digits / "val_labels.npy"))
    assert same and sha256_file(again / "val_images.npy") == sha256_file(digits / "val_images.npy")
    assert sha256_file(other / "val_images.npy") != sha256_file(digits / "val_images.npy")


def test_batches_are_pure_and_ranks_split_the_global_batch(digits: Path) -> None:
    shards = ImageShards(digits, "train")
    whole, whole_labels = shards.batch(seed=3, step=5, rank=0, world_size=1, micro_batch_size=8)
    parts = [shards.batch(3, 5, rank, 2, 4) for rank in range(2)]
    assert np.array_equal(whole, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(whole_labels, np.concatenate([p[1] for p in parts]))
    again, _ = ImageShards(digits, "train").batch(3, 5, 0, 1, 8)
    assert np.array_equal(whole, again)
    assert not np.array_equal(whole, shards.batch(4, 5, 0, 1, 8)[0])
    # One epoch (the split size is a multiple of 8 here) visits every image exactly once.
    assert len(shards) % 8 == 0
    epoch = np.concatenate([shards.batch(3, step, 0, 1, 8)[0] for step in range(len(shards) // 8)])
    seen = sorted(image.tobytes() for image in epoch)
    assert seen == sorted(image.tobytes() for image in shards.arrays()[0])


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_classes_resize_and_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "pets"
    for i in range(3):
        _png(folder / "cat" / f"{i}.png", (20 + i, 16), (200, 10, 10))
        _png(folder / "dog" / f"{i}.jpg", (12, 30), (10, 10, 200))
    out = _prepare(tmp_path, source=str(folder), image_size=8, val_fraction=0.0)
    shards = ImageShards(out, "train")
    assert shards.classes == ["cat", "dog"] and shards.shape == (3, 8, 8)
    images, labels = shards.arrays()
    assert list(labels) == [0, 0, 0, 1, 1, 1]
    red = images[labels == 0][:, 0].mean()
    blue = images[labels == 1][:, 2].mean()
    assert red > 0.5 and blue > 0.5 and images[labels == 0][:, 2].mean() < -0.5


def test_hf_dataset_directory_with_class_label_names(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["zero", "one"])}
    )
    rows = {
        "img": [Image.new("L", (6, 6), 255 * (i % 2)) for i in range(8)],
        "y": [i % 2 for i in range(8)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    out = _prepare(
        tmp_path,
        source={"uri": str(tmp_path / "hf"), "image_field": "img", "label_field": "y"},
        channels=1,
        val_fraction=0.0,
    )
    shards = ImageShards(out, "train")
    images, labels = shards.arrays()
    assert shards.classes == ["zero", "one"] and shards.shape == (1, 6, 6)
    assert np.all(images[labels == 1] == 1.0) and np.all(images[labels == 0] == -1.0)


@pytest.mark.parametrize(
    ("setup", "config", "message"),
    [
        (lambda p: None, {}, "no such image folder"),
        (lambda p: p.mkdir(), {}, "no images found"),
        (lambda p: (p / "a").mkdir(parents=True), {}, "no images found"),
        (
            lambda p: (_png(p / "a" / "0.png", (4, 4), (0, 0, 0)), (p / "b").mkdir()),
            {},
            "class folder 'b' has no images",
        ),
        (
            lambda p: (p / "a").mkdir(parents=True) or (p / "a" / "x.png").write_bytes(b"junk"),
            {},
            "unreadable image",
        ),
        (
            lambda p: (
                _png(p / "a" / "0.png", (4, 4), (0, 0, 0)),
                _png(p / "a" / "1.png", (5, 4), (0, 0, 0)),
            ),
            {},
            "set image_size",
        ),
        (
            lambda p: _png(p / "a" / "0.png", (4, 4), (0, 0, 0)),
            {"num_classes": 3},
            "has 1 classes, num_classes says 3",
        ),
    ],
    ids=["missing", "empty", "no-images", "empty-class", "unreadable", "sizes", "class-count"],
)
def test_bad_image_folders_are_one_line_errors(
    tmp_path: Path, setup: object, config: dict, message: str
) -> None:
    folder = tmp_path / "data"
    setup(folder)  # type: ignore[operator]
    with pytest.raises(PipelineError) as info:
        _prepare(tmp_path, source=str(folder), **config)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.e2e
def test_cli_reports_a_missing_folder_in_one_line(tmp_path: Path) -> None:
    recipe = {
        "name": "imgs",
        "run_dir": str(tmp_path / "run"),
        "tracking": {"mode": "disabled"},
        "stages": {"images": {"kind": "images", "source": str(tmp_path / "nowhere")}},
    }
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such image folder" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
