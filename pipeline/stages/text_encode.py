"""Stage kind `text_encode`: encode every caption of an images export once and cache the result.

A text-to-image stage conditions on these embeddings instead of running a text encoder, so a
sweep over its settings never encodes again; the encoder is frozen, so encoding once is exact.
Inputs: `images` (the nearest upstream images stage, or the one named) and `encoder`, one of

    encoder: pretrain                  # a language-model stage (pretrain, sft, rlhf): its export
    encoder: {path: models/t5-small}   # a model directory: causal LM, T5 or CLIP text model
    encoder: builtin:bag-of-words      # no model: hashed word vectors (the baseline)

How each kind of model encodes is in pipeline/stages/text_encode_models.py; the export's files
and their reader (`TextEmbeddings`) in data_prep/text_embeddings_meta.py. Each distinct caption
is encoded once, in order of first appearance (train, then val), plus the empty caption apart.
Arrays are written through memory maps in batches (memory holds one batch whatever the number
of captions) into partial files moved into place when complete, and meta.json last
(pipeline/stages/text_encode_files.py).

The plan refuses what it can know: an images stage whose source has no captions, an encoder
stage that makes no language model, a directory that is missing or is no model, has no tokenizer,
needs remote code, or has fewer learned positions than max_length.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from data_prep.image_captions import folder_mode, read_captions
from data_prep.image_listing import list_folder
from data_prep.image_sources import DIGITS, SHAPES, ImageSourceConfig, folder_images
from data_prep.images_meta import ImageIndex
from data_prep.sources import HF_MARKERS
from data_prep.text_embeddings_meta import EncoderIdentity, TextEmbeddingsMeta
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, Resolved, StageSpec
from pipeline.engine.locations import TOKENIZER_FILES, Location
from pipeline.stages.text_encode_files import write_arrays, write_tables
from pipeline.stages.text_encode_models import BagOfWords, HFTextEncoder

BAG_OF_WORDS = "builtin:bag-of-words"


class Config(StageConfig):
    """Encode the captions of an images stage with a frozen text encoder, once per caption."""

    kind: Literal["text_encode"] = "text_encode"
    images: str | None = Field(
        None, description="the images stage whose captions to encode; default: the nearest upstream"
    )
    encoder: str | Location = Field(
        description="a language-model stage (pretrain, sft, rlhf), {path: DIR} (a causal LM, T5 "
        f"or CLIP text model directory with its tokenizer), or {BAG_OF_WORDS}"
    )
    max_length: int = Field(
        32, ge=1, description="tokens per caption (words for bag-of-words); longer ones are cut"
    )
    batch_size: int = Field(
        64, ge=1, description="captions per forward pass", json_schema_extra={"fingerprint": False}
    )
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="of the stored states and pooled vectors (computed in float32)"
    )
    layer: int | None = Field(
        None,
        description="hidden state stored: 0 embeddings, i block i, -2 the one before last (CLIP "
        "skip); default: the model's final output (after its final norm)",
    )

    @field_validator("encoder")
    @classmethod
    def _known_builtin(cls, value: str | Location) -> str | Location:
        if isinstance(value, str) and value.startswith("builtin:") and value != BAG_OF_WORDS:
            raise ValueError(f"unknown builtin encoder {value!r}; the builtin is {BAG_OF_WORDS}")
        return value

    @field_validator("layer")
    @classmethod
    def _model_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("encoder") == BAG_OF_WORDS:
            raise ValueError(f"layer is for model encoders; {BAG_OF_WORDS} has no layers")
        return value

    @property
    def bag_of_words(self) -> bool:
        return self.encoder == BAG_OF_WORDS


# ---------------------------------------------------------------------------------------------
# Plan-time checks


def plan_problems(view: PlanView) -> list[str]:
    """What the plan knows: the images stage's source has captions; a model directory has a
    tokenizer, needs no remote code and has positions for max_length tokens."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = []
    images = view.first("images")
    if images is not None and source_captioned(images.config.source) is False:
        problems.append(
            f"{where}: images stage {images.stage!r} reads {images.config.source.uri}, which has "
            f"no captions; use a captioned source (builtin:shapes, an image folder with captions, "
            f"an HF dataset with source.text_field)"
        )
    encoder = view.first("encoder")
    if encoder is not None and encoder.external:
        problems += directory_problems(encoder, where)
    if encoder is not None and (problem := length_problem(cfg, encoder, where)):
        problems.append(problem)
    return problems


def source_captioned(source: ImageSourceConfig) -> bool | None:
    """Whether an images stage's source has captions, from its config and a folder's listing;
    None when the source is not there (the images stage's own checks name it)."""
    if source.uri in (SHAPES, DIGITS):
        return source.uri == SHAPES
    path = Path(source.uri)
    if not path.is_dir():
        return None
    if any((path / marker).is_file() for marker in HF_MARKERS):
        return source.text_field is not None
    if source.captions != "auto":
        return source.captions != "none"
    _, files = list_folder(path)
    return folder_mode("auto", folder_images(files), files) != "none"


def directory_problems(encoder: Resolved, where: str) -> list[str]:
    """A model directory (already checked as a model by the plan) has a tokenizer of its own
    that needs no remote code."""
    path, shown = encoder.path, f"{encoder.where}.path {encoder.label}"
    if not path.is_dir():
        return []  # the engine's location check said why
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return [
            f"{shown}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); an encoder needs its "
            f"tokenizer beside its weights"
        ]
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        tokenizer_config = {}
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("auto_map"):
        return [
            f"{shown}: the tokenizer needs trust_remote_code (tokenizer_config.json has "
            f"auto_map), which this pipeline does not run; use a tokenizer transformers ships"
        ]
    return []


def length_problem(cfg: Config, encoder: Resolved, where: str) -> str | None:
    """max_length past the encoder's learned position table (CLIP's 77, GPT-2's n_positions)."""
    from eval.families import learned_positions
    from eval.lm import position_limit

    if not encoder.external:
        limit = position_limit(encoder)  # a pretrain stage's family config, or its directory's
    else:
        try:
            config = json.loads((encoder.path / "config.json").read_text("utf-8"))
            limit = learned_positions(config.get("text_config") or config)  # CLIP: text part
        except (OSError, ValueError, AttributeError):
            limit = None  # the engine's location check names the directory
    if limit is None or cfg.max_length <= limit:
        return None
    return (
        f"{where}.max_length: {cfg.max_length} tokens per caption, but {encoder.label} has "
        f"learned positions for {limit}; use max_length: {limit} or less"
    )


# ---------------------------------------------------------------------------------------------
# Running


def run(ctx: StageContext) -> None:
    """Encode the distinct captions and the empty one; write the arrays, then meta.json."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    where = f"stages.{ctx.name}"
    images = ctx.input("images")
    index = ImageIndex.read(images.path)
    if not index.captioned:
        raise PipelineError(
            f"{where}: images stage {images.label!r} wrote no captions (source {index.source}); "
            f"use a captioned source there and rerun it"
        )
    splits = sorted(index.splits, key=lambda split: split != "train")  # train's rows first
    captions = {split: read_captions(images.path, split) for split in splits}
    unique, ids = caption_table(captions)
    encoder = build_encoder(ctx, cfg, where)
    started = time.perf_counter()
    files, truncated, (dim, pooled_dim) = write_arrays(
        ctx.export_dir, encoder, unique, cfg.dtype, cfg.batch_size, where,
        lambda items, total, desc: ctx.progress(items, total=total, desc=desc),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    files |= write_tables(ctx.export_dir, unique, ids)
    TextEmbeddingsMeta(
        encoder=encoder.identity, dim=dim, pooled_dim=pooled_dim, max_length=cfg.max_length,
        dtype=cfg.dtype, num_images={s: len(c) for s, c in captions.items()},
        num_unique=len(unique), num_truncated=int(truncated.sum()), files_sha256=files,
        images_captions_sha256={s: index.splits[s].captions_sha256 or "" for s in splits},
        source=index.source,
    ).write(ctx.export_dir)  # fmt: skip
    report(ctx, cfg, encoder.identity, captions, ids, truncated, seconds)


def caption_table(captions: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(distinct captions in order of first appearance, each split's int64 image -> row)."""
    rows: dict[str, int] = {}
    ids = {
        split: np.array([rows.setdefault(text, len(rows)) for text in texts], np.int64)
        for split, texts in captions.items()
    }
    return list(rows), ids


def build_encoder(ctx: StageContext, cfg: Config, where: str) -> BagOfWords | HFTextEncoder:
    """The builtin, or the text encoder of the encoder stage's export or directory."""
    if cfg.bag_of_words:
        return BagOfWords(cfg.max_length)
    source = ctx.input("encoder")
    identity = EncoderIdentity(
        kind="directory" if source.external else "stage",
        name=source.path.name if source.external else str(source.stage),
    )
    return HFTextEncoder(source.path, identity, cfg.max_length, cfg.layer, where)


def report(
    ctx: StageContext,
    cfg: Config,
    identity: EncoderIdentity,
    captions: dict[str, list[str]],
    ids: dict[str, np.ndarray],
    truncated: np.ndarray,
    seconds: float,
) -> None:
    """Log and summarise counts, cut captions and speed."""
    total, distinct = sum(len(texts) for texts in captions.values()), len(truncated)
    cut_images = sum(int(truncated[rows].sum()) for rows in ids.values())
    per_second = distinct / max(seconds, 1e-9)
    ctx.log.info(
        "%d captions (%s), %d distinct; %d distinct (%d images) cut to %d tokens; encoded with "
        "%s in %.2fs (%.0f captions/s)",
        total, ", ".join(f"{s} {len(t)}" for s, t in captions.items()), distinct,
        int(truncated.sum()), cut_images, cfg.max_length, identity.name, seconds, per_second,
    )  # fmt: skip
    ctx.write_summary(
        {
            "captions": total,
            "distinct_captions": distinct,
            "truncated_captions": int(truncated.sum()),
            "encode_seconds": round(seconds, 3),
            "captions_per_second": round(per_second, 1),
        },
        headline="distinct_captions",
    )


SPEC = StageSpec(
    Config,
    run,
    output="text_embeddings",
    inputs=(
        Input("images", ("images",), field="images"),
        Input(
            "encoder",
            ("lm",),
            field="encoder",
            location="model",
            nearest=False,
            builtins=(BAG_OF_WORDS,),
        ),  # fmt: skip
    ),
    plan_check=plan_problems,
)
