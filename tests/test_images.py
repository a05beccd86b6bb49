"""Image data prep: shard format, exact batches, folder and HF sources, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.images import Config, ImageShards, prepare_images
from data_prep.images_meta import ImageIndex
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


def test_the_index_record_writes_the_bytes_it_read(tmp_path: Path, digits: Path) -> None:
    """An index reads back and rewrites byte for byte, keys in order, so earlier exports read."""
    written = (digits / "index.json").read_bytes()
    index = ImageIndex.read(digits)
    index.write(tmp_path / "images")
    assert (tmp_path / "images" / "index.json").read_bytes() == written
    keys = ["format", "shape", "dtype", "normalisation", "classes", "splits", "source"]
    assert list(json.loads(written)) == keys
    latents = index.model_copy(update={"dtype": "float32", "scaling_factor": 0.5})
    latents.write(tmp_path / "latents")
    latent_keys = list(json.loads((tmp_path / "latents" / "index.json").read_text()))
    assert latent_keys == [*keys[:-1], "scaling_factor", "source"]  # as the vae stage wrote them


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "missing; run the images stage first"),
        ('{"format": "image-shards/1", "shape": [1, 8', "unreadable (Expecting "),
        ('{"format": "image-shards/1"}', "unreadable (shape: Field required); rerun the images"),
        ("[]", "unreadable (Input should be a valid dictionary"),
    ],
    ids=["missing", "truncated", "incomplete", "not-an-object"],
)
def test_a_missing_or_damaged_index_is_one_line_naming_the_stage_to_rerun(
    tmp_path: Path, digits: Path, text: str | None, problem: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    if text is None:
        (copy / "index.json").unlink()
    else:
        (copy / "index.json").write_text(text)
    with pytest.raises(PipelineError) as info:
        ImageShards(copy, "train")
    message = str(info.value)
    assert message.startswith(f"{copy / 'index.json'}: {problem}"), message
    assert message.endswith(
        " the images stage first" if text is None else "; rerun the images stage"
    )
    assert "\n" not in message
    with pytest.raises(PipelineError, match="run the vae stage"):  # latents name their writer
        ImageShards(copy, "train", writer="vae")


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
    assert result.returncode == 2  # a bad input is found before anything runs (checks.py)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such image folder" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Images at scale: streaming writes, bounded memory, the cached folder listing


def _stacked_reference(cfg: Config, out: Path, seed: int) -> None:
    """The in-memory path the images stage used before streaming: stack, mask, np.save."""
    from data_prep.image_sources import read_source, to_array
    from data_prep.images import is_val_image

    channels = cfg.channels or (1 if cfg.source.uri == "builtin:digits" else 3)
    _, items = read_source(cfg.source)
    rows = [
        (to_array(image, channels, cfg.image_size, where), label) for image, label, where in items
    ]
    data = np.stack([array for array, _ in rows])
    labels = np.asarray([label for _, label in rows], dtype=np.int64)
    is_val = np.array([is_val_image(i, seed, cfg.val_fraction) for i in range(len(data))])
    out.mkdir(parents=True)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        np.save(out / f"{split}_images.npy", np.ascontiguousarray(data[mask]))
        np.save(out / f"{split}_labels.npy", np.ascontiguousarray(labels[mask], dtype=np.int64))


def _pets(folder: Path) -> Path:
    """Two classes, odd sizes, a nested folder whose name sorts differently by string and by
    path parts ('a-b' < 'a/b' as text, 'a' < 'a-b' as parts)."""
    for i in range(5):
        _png(folder / "cat" / f"{i}.png", (20 + i, 16), (200, 10 + 40 * i, 10))
        _png(folder / "dog" / f"{i}.jpg", (12, 30), (10, 10 + 30 * i, 200))
    _png(folder / "dog" / "a" / "b.png", (9, 9), (1, 2, 3))
    _png(folder / "dog" / "a-b.png", (9, 9), (4, 5, 6))
    return folder


@pytest.mark.parametrize(
    "config",
    [
        {"image_size": 8, "val_fraction": 0.3},
        {"image_size": 6, "val_fraction": 0.0, "channels": 1},
        {"source": "builtin:digits", "val_fraction": 0.2},
    ],
    ids=["folder", "folder-no-val", "digits"],
)
def test_streamed_images_are_byte_identical_to_the_stacked_path(
    tmp_path: Path, config: dict
) -> None:
    cfg = Config.model_validate(
        {"kind": "images", "source": str(_pets(tmp_path / "pets")), **config}
    )
    streamed, stacked = tmp_path / "streamed", tmp_path / "stacked"
    index = prepare_images(cfg, streamed, seed=7)
    _stacked_reference(cfg, stacked, seed=7)
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        assert (streamed / f"{name}.npy").read_bytes() == (stacked / f"{name}.npy").read_bytes()
    assert sorted(p.name for p in streamed.iterdir()) == sorted(
        ["index.json", "train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy"]
    )  # no partial files left behind
    for split in ("train", "val"):
        assert index.splits[split].count == len(np.load(stacked / f"{split}_labels.npy"))


def test_writing_a_large_image_folder_keeps_memory_bounded(tmp_path: Path) -> None:
    import tracemalloc

    folder, count, side = tmp_path / "big", 400, 48
    for i in range(count):
        _png(folder / f"c{i % 4}" / f"{i:04d}.png", (side, side), (i % 256, 7 * i % 256, 99))
    pixel_bytes = count * 3 * side * side  # 2.8 MB of uint8 pixels in the shards
    tracemalloc.start()
    try:
        _prepare(tmp_path, source=str(folder), val_fraction=0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shards = ImageShards(tmp_path / "export_0", "train")
    assert len(shards) + len(ImageShards(tmp_path / "export_0", "val")) == count
    # Holding the images (as the stacked path did, twice over) would need > pixel_bytes.
    assert peak < pixel_bytes / 4, f"peak {peak} bytes for {pixel_bytes} bytes of pixels"


def test_hf_images_stream_in_batches_in_row_order(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    from data_prep.image_sources import HF_BATCH_ROWS

    rows = 2 * HF_BATCH_ROWS + 5
    values = [10, 20, 30]
    data = {
        "image": [Image.new("L", (4, 4), i % 256) for i in range(rows)],
        "label": [values[i % 3] for i in range(rows)],
    }
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf"))
    out = _prepare(tmp_path, source=str(tmp_path / "hf"), channels=1, val_fraction=0.0)
    images, labels = ImageShards(out, "train").arrays()
    assert ImageShards(out, "train").classes == ["10", "20", "30"]
    assert list(labels) == [i % 3 for i in range(rows)]
    pixels = np.rint((images[:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert list(pixels) == [i % 256 for i in range(rows)]


def _age(folder: Path, seconds: float = 60.0) -> None:
    """Date every directory and file under `folder` back, as for a dataset written a while ago."""
    import os
    import time

    past = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (past, past))


def _small_folder(folder: Path) -> Path:
    """Three classes of three 4x4 BMPs (a BMP's size depends only on its shape), dated back."""
    from PIL import Image

    for name in ("a", "b", "c"):
        for i in range(3):
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), 40 * i).save(folder / name / f"{i}.bmp")
    _age(folder)
    return folder


def test_images_listing_cache_lists_only_changed_directories(tmp_path: Path) -> None:
    from data_prep.image_listing import folder_signature

    folder, cache = _small_folder(tmp_path / "data"), tmp_path / "cache" / "listing.json"
    first = folder_signature(folder, cache)
    assert (first.files, first.dirs_listed, first.files_statted) == (9, 4, 9) and cache.is_file()
    second = folder_signature(folder, cache)
    assert second == type(first)(9, first.sha256, 0, 0)  # nothing listed or stat'ed again
    _png(folder / "b" / "new.png", (4, 4), (0, 0, 0))
    third = folder_signature(folder, cache)
    assert (third.files, third.dirs_listed, third.files_statted) == (10, 1, 4)
    assert third.sha256 != first.sha256
    # Without a cache, or with a rescan, the same folder gives the same signature.
    fresh = folder_signature(folder, tmp_path / "other.json")
    assert (fresh.sha256, fresh.dirs_listed) == (third.sha256, 4)
    rescanned = folder_signature(folder, cache, rescan=True)
    assert (rescanned.sha256, rescanned.dirs_listed, rescanned.files_statted) == (
        third.sha256, 4, 10
    )  # fmt: skip


def test_images_stage_goes_stale_on_added_removed_and_rescanned_in_place_changed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from data_prep.image_listing import cache_path, folder_signature
    from pipeline.engine.config import validate_recipe
    from pipeline.engine.graph import plan, rescan
    from pipeline.engine.runner import run_recipe

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    folder = _small_folder(tmp_path / "data")
    outside = tmp_path / "linked"  # a class folder that is a symlink is followed
    _png(outside / "0.png", (4, 4), (9, 9, 9))
    (folder / "d").symlink_to(outside)
    _age(folder)
    _age(outside)
    recipe = validate_recipe(
        {
            "name": "imgs",
            "run_dir": str(tmp_path / "run"),
            "tracking": {"mode": "disabled"},
            "stages": {"images": {"kind": "images", "source": str(folder), "val_fraction": 0}},
        }
    )

    def stale() -> tuple[bool, str]:
        step = plan(recipe)[0]
        return step.run, step.reason

    def rerun() -> None:
        run_recipe(recipe)
        assert stale() == (False, "up to date")

    rerun()
    assert cache_path(folder).is_file()
    _png(folder / "a" / "added.png", (4, 4), (1, 1, 1))
    assert stale() == (True, "config or upstream changed")
    rerun()
    (folder / "c" / "1.bmp").unlink()
    assert stale() == (True, "config or upstream changed")
    rerun()
    _png(outside / "1.png", (4, 4), (2, 2, 2))
    assert stale() == (True, "config or upstream changed")
    rerun()
    # In place: same size, new content and mtime; the directory's stamp does not change.
    _age(folder)
    _age(outside)
    rerun()  # dating the files back changed their mtimes
    target, before = folder / "b" / "2.bmp", (folder / "b").stat()
    old = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    assert target.stat().st_size == old.st_size
    assert (folder / "b").stat().st_mtime_ns == before.st_mtime_ns
    assert folder_signature(folder).dirs_listed == 0
    assert stale() == (False, "up to date")  # by default the directory's stamp is trusted
    with rescan():
        assert stale() == (True, "config or upstream changed")


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "edited-body", "name-without-stats", "gone-subdirectory",
     "other-root", "old-format"],
)  # fmt: skip
def test_images_corrupted_listing_cache_is_rebuilt_never_trusted(
    tmp_path: Path, damage: str
) -> None:
    import hashlib
    import json

    from data_prep.image_listing import FORMAT, folder_signature

    folder, cache = _small_folder(tmp_path / "data"), tmp_path / "listing.json"
    folder_signature(folder, cache)
    _png(folder / "a" / "extra.png", (4, 4), (5, 5, 5))
    _age(folder)
    truth = folder_signature(folder, tmp_path / "fresh.json")
    folder_signature(folder, cache)  # the cache now lists extra.png
    head, _, body = cache.read_bytes().partition(b"\n")
    data = json.loads(body)
    fmt = FORMAT
    if damage == "garbage":
        cache.write_bytes(b"\x00\xffnot a listing")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: len(head) + 40])
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "edited-body":  # hides a file but keeps the old checksum
        data["dirs"]["a"][1].remove("extra.png")
        cache.write_bytes(head + b"\n" + json.dumps(data).encode())
    else:  # a valid checksum over a listing that is wrong
        if damage == "name-without-stats":
            data["dirs"]["a"][1].append("gone.png")
        elif damage == "gone-subdirectory":
            data["dirs"][""][2].append("gone")
            data["dirs"]["gone"] = [[1, 1, 1], ["x.png"], [], [1], [1]]
        elif damage == "other-root":
            data["root"] = str(tmp_path / "elsewhere")
        else:
            fmt = "image-listing/1"
        forged = json.dumps(data).encode()
        cache.write_bytes(f"{fmt} {hashlib.sha256(forged).hexdigest()}\n".encode() + forged)
    again = folder_signature(folder, cache)
    assert (again.files, again.sha256, again.dirs_listed) == (truth.files, truth.sha256, 4)
    assert folder_signature(folder, cache).dirs_listed == 0  # rebuilt and trusted again
