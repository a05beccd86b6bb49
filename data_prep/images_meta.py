"""The hand-off record of image shards (index.json): what the arrays beside it hold.

The images stage writes it for uint8 pixels, the vae stage for its float32 latents; the vae,
diffusion and image_eval stages and the generative baselines read it through `ImageIndex.read`,
never by key. `writer` names the stage kind that wrote the shards, so a missing or damaged index
says which stage to rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.engine.manifest import atomic_write_json, read_record

FORMAT = "image-shards/1"
INDEX_FILE = "index.json"
UINT8_NORMALISATION = "x / 127.5 - 1"
IDENTITY = "identity"


class ImageSplit(BaseModel):
    """One split's image count and the checksums of its two arrays, and of its captions and
    scenes where the source has them (data_prep/image_captions.py; absent otherwise)."""

    count: int
    images_sha256: str
    labels_sha256: str
    captions_sha256: str | None = None  # <split>_captions.jsonl
    scenes_sha256: str | None = None  # <split>_scenes.jsonl (builtin:shapes)


class ImageIndex(BaseModel):
    """Shape, dtype, normalisation, class names and splits of an image (or latent) export."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["image-shards/1"] = FORMAT
    shape: list[int]  # [C, H, W] of one image
    dtype: Literal["uint8", "float32"]
    normalisation: Literal["x / 127.5 - 1", "identity"]
    classes: list[str]
    splits: dict[str, ImageSplit]
    scaling_factor: float | None = None  # latents: 1 / their std on the train split
    source: str  # the images stage's source uri, or the export the latents encode

    @property
    def captioned(self) -> bool:
        """Whether every split has captions (read them with image_captions.read_captions)."""
        return all(split.captions_sha256 is not None for split in self.splits.values())

    def write(self, export_dir: Path) -> None:
        """Write export_dir/index.json (atomically); fields left unset (scaling_factor, the
        caption and scene checksums) are left out, so the index reads as it did before them."""
        atomic_write_json(Path(export_dir) / INDEX_FILE, self.model_dump(exclude_none=True))

    @classmethod
    def read(cls, export_dir: Path, writer: str = "images") -> ImageIndex:
        """The index.json of shards written by a `writer` stage, or a one-line error."""
        return read_record(cls, Path(export_dir) / INDEX_FILE, writer)
