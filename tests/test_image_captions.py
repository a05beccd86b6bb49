"""Captioned images: sidecar and metadata.jsonl folders, HF caption columns, builtin:shapes,
one-line errors at plan time, the caption files of the export and their reader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from data_prep.image_captions import read_captions, read_scenes
from data_prep.images import Config, ImageShards, prepare_images
from data_prep.images_meta import ImageIndex
from pipeline.engine.errors import PipelineError
from tests.helpers import cli, write_recipe

# Image i's red channel is 40 i (near it for the JPEG), so pixels say whose caption is whose.
CAPTIONS = ["a red fox", "  padded  \n", "", "naïve café ☕", "line one\nline two"]
NAMES = ["b.png", "a/z.png", "a/b/c.jpg", "a-b.png", "c.bmp"]  # sorted: a-b, a/b/c, a/z, b, c


def _png(path: Path, red: int, size: tuple[int, int] = (6, 6)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (red, 7, 9)).save(path)


def _sidecars(folder: Path) -> Path:
    """NAMES with CAPTIONS beside them, a hidden folder and a stray non-text file."""
    for i, (name, caption) in enumerate(zip(NAMES, CAPTIONS, strict=True)):
        _png(folder / name, 40 * i)
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    _png(folder / ".ipynb_checkpoints" / "b.png", 255)  # hidden: neither image nor caption
    (folder / "notes.md").write_text("not a caption")
    return folder


def _metadata(folder: Path) -> Path:
    """NAMES with a metadata.jsonl (lines out of order, a blank line, a ./ prefix)."""
    lines = []
    for i, (name, caption) in enumerate(zip(NAMES, CAPTIONS, strict=True)):
        _png(folder / name, 40 * i)
        lines.append(json.dumps({"file_name": ("./" if i == 1 else "") + name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines[::-1]) + "\n\n", encoding="utf-8")
    (folder / "b.txt").write_text("ignored: metadata.jsonl wins under captions: auto")
    return folder


def _prepare(tmp_path: Path, seed: int = 0, **config: Any) -> Path:
    out = tmp_path / f"export_{seed}"
    prepare_images(Config.model_validate({"kind": "images", **config}), out, seed=seed)
    return out


def _pairs(export: Path) -> list[tuple[int, str]]:
    """(red value, caption) of every image of both splits, sorted by red value."""
    pairs = []
    for split in ("train", "val"):
        images, _ = ImageShards(export, split).arrays()
        reds = 40 * np.rint((images[:, 0, 0, 0] + 1) * 127.5 / 40).astype(int)
        pairs += zip(reds.tolist(), read_captions(export, split), strict=True)
    return sorted(pairs)


@pytest.mark.parametrize("layout", [_sidecars, _metadata], ids=["sidecar", "metadata"])
def test_captions_are_read_in_image_order_beside_their_images(tmp_path: Path, layout: Any) -> None:
    folder = layout(tmp_path / "data")
    expected = sorted((40 * i, caption.strip()) for i, caption in enumerate(CAPTIONS))
    out = _prepare(tmp_path, source=str(folder), val_fraction=0.4)
    assert _pairs(out) == expected  # every image keeps its own caption, whichever split
    index = ImageIndex.read(out)
    assert index.classes == ["image"] and index.captioned
    assert sum(split.count for split in index.splits.values()) == len(NAMES)
    train = ImageShards(out, "train")
    assert set(np.asarray(train.labels)) == {0} and train.captions() == read_captions(out)
    lines = (out / "train_captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in train.captions()]
    train.verify()
    # With no val split, the order is the images' path order.
    whole = _prepare(tmp_path, seed=1, source=str(folder), val_fraction=0.0)
    order = sorted(range(len(NAMES)), key=lambda i: NAMES[i].split("/"))
    assert read_captions(whole) == [CAPTIONS[i].strip() for i in order]
    assert read_captions(whole, "val") == []


def test_hf_dataset_with_a_text_column(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    rows = {
        "picture": [Image.new("RGB", (4, 4), (i * 30, 0, 0)) for i in range(6)],
        "caption": [f"caption {i}" for i in range(6)],
    }
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    source = {"uri": str(tmp_path / "hf"), "image_field": "picture", "text_field": "caption"}
    out = _prepare(tmp_path, source=source, val_fraction=0.0)
    assert ImageShards(out).classes == ["image"]
    assert read_captions(out) == [f"caption {i}" for i in range(6)]
    # With a label column too, the classes are kept beside the captions.
    labelled = {**rows, "label": [i % 2 for i in range(6)]}
    datasets.Dataset.from_dict(labelled).save_to_disk(str(tmp_path / "hf2"))
    out = _prepare(tmp_path, seed=1, source={**source, "uri": str(tmp_path / "hf2")})
    shards = ImageShards(out, "train")
    images, labels = shards.arrays()
    row = np.rint((images[:, 0, 0, 0] + 1) * 127.5 / 30).astype(int)  # red is 30 x the row
    assert shards.classes == ["0", "1"] and list(labels) == [i % 2 for i in row]
    assert shards.captions() == [f"caption {i}" for i in row]
    # A row without a caption.
    rows["caption"][3] = None
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf3"))
    with pytest.raises(PipelineError, match=r"hf3 row 3: column 'caption' is empty \(None\)"):
        _prepare(tmp_path, seed=2, source={**source, "uri": str(tmp_path / "hf3")})


def _without(name: str) -> Any:
    return lambda folder: (_sidecars(folder), (folder / name).unlink())


def _write(name: str, data: bytes, layout: Any = _sidecars) -> Any:
    return lambda folder: (layout(folder), (folder / name).write_bytes(data))


def _hf(folder: Path) -> None:
    import datasets
    from PIL import Image

    datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4))], "label": [0]}).save_to_disk(
        str(folder)
    )


BAD_FOLDERS = {
    "missing-sidecar": (
        _without("a/z.txt"), {}, "image a/z.png has no caption file a/z.txt; add it"
    ),
    "extra-sidecar": (
        _write("a/orphan.txt", b"x"), {}, "caption file a/orphan.txt has no image beside it"
    ),
    "orphan-sidecar-flat": (
        lambda f: (_png(f / "a.png", 1), (f / "x.txt").write_text("x")), {},
        "caption file x.txt has no image beside it; no image has a caption file either: give "
        "each image one with its name (a.txt beside a.png)",
    ),
    "orphan-sidecar-alone": (
        lambda f: (f.mkdir(parents=True), (f / "x.txt").write_text("x")), {},
        "caption file x.txt has no image beside it; nor any image: add x.png",
    ),
    "shared-sidecar": (
        lambda f: (_sidecars(f), _png(f / "b.jpg", 1)), {}, "images b.jpg and b.png share the "
        "caption file b.txt",
    ),
    "not-utf8-sidecar": (
        _write("a/z.txt", b"caf\xe9 au lait"), {}, "a/z.txt: caption is not UTF-8 (byte offset 3: invalid"
    ),
    "metadata-missing-row": (
        lambda f: (_metadata(f), _png(f / "new.png", 1)), {}, "image new.png has no line in "
        "metadata.jsonl; add",
    ),
    "metadata-extra-row": (
        _write("metadata.jsonl", b'{"file_name": "b.png", "text": "x"}\n{"file_name": '
               b'"gone.png", "text": "y"}\n', _metadata), {},
        "metadata.jsonl line 2: file_name 'gone.png' does not exist",
    ),
    "metadata-malformed-line": (
        _write("metadata.jsonl", b'{"file_name": "b.png", "text": "x"}\n{"file_name": \n',
               _metadata), {}, "metadata.jsonl line 2: not JSON (",
    ),
    "metadata-no-text": (
        _write("metadata.jsonl", b'{"file_name": "b.png"}\n', _metadata), {},
        'metadata.jsonl line 1: not an object with string "file_name" and "text"',
    ),
    "metadata-not-utf8": (
        _write("metadata.jsonl", b'{"file_name": "b.png", "text": "x"}\n{"text": "\xff"}\n',
               _metadata), {}, "metadata.jsonl line 2: not UTF-8 (byte offset 46: invalid start byte)",
    ),
    "metadata-outside": (
        _write("metadata.jsonl", b'{"file_name": "../b.png", "text": "x"}\n', _metadata), {},
        "line 1: file_name '../b.png' is not a path inside the folder",
    ),
    "metadata-asked-absent": (
        _sidecars, {"captions": "metadata"}, "no metadata.jsonl (captions: metadata); add one"
    ),
    "sidecar-on-hf": (_hf, {"captions": "sidecar"}, "captions: sidecar is for an image folder"),
}  # fmt: skip


@pytest.mark.parametrize(("setup", "source", "message"), BAD_FOLDERS.values(), ids=BAD_FOLDERS)
def test_bad_captions_are_one_line_errors_naming_the_file(
    tmp_path: Path, setup: Any, source: dict, message: str
) -> None:
    folder = tmp_path / "data"
    setup(folder)
    cfg = Config.model_validate({"kind": "images", "source": {"uri": str(folder), **source}})
    with pytest.raises(PipelineError) as info:
        cfg.check_inputs()
        prepare_images(cfg, tmp_path / "out", seed=0)  # a sidecar's bytes are read here
    text = str(info.value)
    assert message in text and str(folder) in text and "\n" not in text, text
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir())  # nothing left, partial files neither


def test_check_inputs_pairs_captions_without_decoding_images(tmp_path: Path) -> None:
    folder = _sidecars(tmp_path / "data")
    (folder / "c.bmp").write_bytes(b"not an image, but only the first image is decoded")
    cfg = Config.model_validate({"kind": "images", "source": str(folder)})
    cfg.check_inputs()
    (folder / "c.txt").unlink()
    with pytest.raises(PipelineError, match="image c.bmp has no caption file c.txt"):
        cfg.check_inputs()


def test_the_caption_reader_checks_what_it_reads(tmp_path: Path) -> None:
    out = _prepare(tmp_path, source=str(_sidecars(tmp_path / "data")), val_fraction=0.0)
    path = out / "train_captions.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace("fox", "cat"), encoding="utf-8")
    with pytest.raises(PipelineError) as info:
        read_captions(out)
    assert str(info.value) == f"{path}: checksum mismatch; rerun the images stage"
    with pytest.raises(PipelineError, match="checksum mismatch"):
        ImageShards(out).verify()
    plain = tmp_path / "plain"
    _png(plain / "cat" / "0.png", 1)
    out = _prepare(tmp_path, seed=1, source=str(plain), val_fraction=0.0)
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy"
    ]  # fmt: skip
    with pytest.raises(PipelineError, match=r"the train split has no captions \(source .*plain\)"):
        read_captions(out)
    with pytest.raises(PipelineError, match="no scenes .* use source builtin:shapes"):
        read_scenes(out)


def test_class_folders_keep_their_config_and_signature(tmp_path: Path) -> None:
    """The caption options at their defaults leave a class folder's fingerprint as it was."""
    plain = tmp_path / "plain"
    _png(plain / "cat" / "0.png", 1)
    (plain / "LICENSE.txt").write_text("a text file that captions no image")
    cfg = Config.model_validate({"kind": "images", "source": str(plain)})
    assert set(cfg.model_dump()["source"]) == {
        "uri", "image_field", "label_field", "split", "max_images"
    }  # fmt: skip
    assert set(cfg.data_signature()) == {"files", "listing_sha256"}
    out = _prepare(tmp_path, source=str(plain), val_fraction=0.0)
    assert ImageShards(out).classes == ["cat"] and not ImageIndex.read(out).captioned
    captioned = Config.model_validate({"kind": "images", "source": str(_metadata(tmp_path / "m"))})
    assert captioned.data_signature()["captions"] == "metadata"
    assert set(captioned.model_dump()["source"]) == set(cfg.model_dump()["source"])


def test_an_in_place_edit_of_metadata_jsonl_reruns_the_stage(tmp_path: Path) -> None:
    from pipeline.engine.config import validate_recipe
    from pipeline.engine.graph import plan
    from pipeline.engine.runner import run_recipe

    folder = _metadata(tmp_path / "data")
    recipe = validate_recipe(
        {
            "name": "captions",
            "run_dir": str(tmp_path / "run"),
            "tracking": {"mode": "disabled"},
            "stages": {"images": {"kind": "images", "source": str(folder), "val_fraction": 0}},
        }
    )
    run_recipe(recipe)
    assert plan(recipe)[0].reason == "up to date"
    path, stat = folder / "metadata.jsonl", (folder / "metadata.jsonl").stat()
    text = path.read_text(encoding="utf-8").replace("a red fox", "a red cat")
    with open(path, "r+", encoding="utf-8") as f:  # in place: the folder's listing is unchanged
        f.write(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert plan(recipe)[0].run
    run_recipe(recipe)
    assert "a red cat" in read_captions(tmp_path / "run" / "images" / "export")


def test_builtin_shapes_writes_the_generators_scenes_and_captions(tmp_path: Path) -> None:
    from data_prep import shapes

    source = {"uri": "builtin:shapes", "max_images": 8, "val_images": 4}
    out = _prepare(tmp_path, seed=3, source=source, image_size=16)
    train = list(shapes.scenes("train", 8, seed=3))
    test = list(shapes.scenes("test", 4, seed=3))  # val is the generator's held-out split
    for split, scenes in (("train", train), ("val", test)):
        assert read_captions(out, split) == [scene.caption for scene in scenes]
        assert read_scenes(out, split) == [scene.to_json() for scene in scenes]
        shards = ImageShards(out, split)
        assert shards.classes == list(shapes.CATEGORIES)
        assert list(shards.labels) == [shapes.CATEGORIES.index(s.category) for s in scenes]
        rendered = np.stack([np.asarray(shapes.render(s, 16)).transpose(2, 0, 1) for s in scenes])
        assert np.array_equal(np.asarray(shards.images), rendered)
        shards.verify()
    assert any(scene["unseen"] for scene in read_scenes(out, "val"))
    index = json.loads((out / "index.json").read_text())
    assert set(index["splits"]["val"]) == {
        "count", "images_sha256", "labels_sha256", "captions_sha256", "scenes_sha256"
    }  # fmt: skip
    Config.model_validate({"kind": "images", "source": source, "val_fraction": 0.1})  # default
    with pytest.raises(ValidationError, match="holds out the generator's test split"):
        Config.model_validate({"kind": "images", "source": source, "val_fraction": 0.2})
    with pytest.raises(ValidationError, match="only builtin:shapes has a held-out split"):
        Config.model_validate({"kind": "images", "source": {"uri": "x", "val_images": 3}})
    too_small = Config.model_validate({"kind": "images", "source": source, "image_size": 8})
    with pytest.raises(PipelineError, match="too small"):
        too_small.check_inputs()


@pytest.mark.e2e
def test_cli_refuses_a_missing_caption_before_running_then_writes_the_captions(
    tmp_path: Path,
) -> None:
    folder = _sidecars(tmp_path / "data")
    (folder / "a" / "z.txt").unlink()
    run_dir = tmp_path / "run"
    recipe = {
        "name": "captions",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "stages": {"images": {"kind": "images", "source": str(folder), "val_fraction": 0}},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = cli("run", "--dry-run", str(path))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "image a/z.png has no caption file a/z.txt" in errors[0]
    assert "Traceback" not in result.stderr and not (run_dir / "images").exists()

    (folder / "a" / "z.txt").write_text("a zebra")
    assert cli("run", str(path)).returncode == 0
    export = run_dir / "images" / "export"
    assert "a zebra" in read_captions(export)
    # A caption saved anew (as editors do: a new file renamed over the old) reruns the stage.
    (folder / "a" / "new.txt").write_text("a striped zebra")
    os.replace(folder / "a" / "new.txt", folder / "a" / "z.txt")
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    assert "a striped zebra" in read_captions(export) and "a zebra" not in read_captions(export)
