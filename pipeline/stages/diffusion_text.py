"""Text conditioning in the diffusion stage: a pixart or mmdit denoiser trains on an images
stage's captions as a text_encode stage cached them (pipeline.models.text_denoisers).

Each image's label becomes its caption's row in the cached table (`ImageShards.relabel`), and
the table's last row is the empty caption: the objective's label dropout (`label_dropout`)
drops captions to "" for classifier-free guidance with no other change to the loop, its
batches, EMA, engines or exact resume. The text_encode stage must have encoded the captions of
the same images stage (checked by the captions' checksums). The export is a
`TextToImagePipeline` (pipeline/diffusion/text_to_image_pipeline.py) with the cached captions
beside the weights; its model_index.json names diffusers' `PixArtAlphaPipeline` instead where
that class samples the same images (pipeline/diffusion/plain_pipeline.py), so a plain
`DiffusionPipeline.from_pretrained(export)` loads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine import faults
from pipeline.engine.inputs import Input, PlanView, Resolved
from pipeline.engine.rundir import EXPORT_DIR

if TYPE_CHECKING:
    from data_prep.images import ImageShards
    from pipeline.engine.context import StageContext
    from pipeline.models.text_denoisers import CaptionTable

TEXT_INPUT = Input("text", ("text_embeddings",), required=False)


def is_text_arch(arch: str) -> bool:
    from pipeline.models.diffusion import DENOISERS

    return DENOISERS[arch].text


def text_problems(view: PlanView) -> list[str]:
    """A text-conditioned arch needs a text_encode stage upstream."""
    if is_text_arch(view.config.model.arch) and view.first("text") is None:
        return [
            f"stages.{view.name}.model.arch: {view.config.model.arch} is conditioned on "
            f"captions and needs a text_encode stage upstream; add one (kind: text_encode) "
            f"and list it in `after:`, or use arch dit or unet"
        ]
    return []


def caption_table(
    ctx: StageContext, images_dir: Path, splits: tuple[ImageShards, ImageShards]
) -> CaptionTable:
    """The text_encode stage's caption table (the empty caption as its last row), with each
    split's labels replaced by its images' caption rows."""
    import numpy as np

    from data_prep.text_embeddings_meta import TextEmbeddings
    from pipeline.models.text_denoisers import CaptionTable

    cached = TextEmbeddings(ctx.input("text").path)
    cached.check_images(images_dir)  # the captions of these images, as they are now
    for shards in splits:
        shards.relabel(cached.caption_ids(shards.split))
    count, empty = len(cached), cached.empty()

    def lookup(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        arrays = cached.states(np.minimum(rows, count - 1))
        null = rows == count
        for array, value in zip(arrays, empty, strict=True):
            array[null] = value[0]
        return arrays

    return CaptionTable(count + 1, cached.meta.dim, cached.meta.pooled_dim, lookup)


def table_with_empty(cached: Any) -> tuple[Any, ...]:
    """(states, mask, pooled) of every cached caption and then the empty one, whole."""
    import numpy as np

    rows = cached.states(np.arange(len(cached)))
    return tuple(np.concatenate([a, e]) for a, e in zip(rows, cached.empty(), strict=True))


def export_text_pipeline(
    export_dir: Path,
    denoiser: Any,
    state_dict: dict[str, Any],
    scheduler: Any,
    vae_dir: Path | None,
    text: Resolved,
    objective: str,
    config: dict[str, Any] | None = None,
) -> str:
    """Save a TextToImagePipeline with `state_dict` (the EMA weights of the wrapped transformer),
    the text encoder of the text_encode stage `text` and its cached captions into export_dir,
    through a temporary directory renamed into place, named PixArtAlphaPipeline where that
    class samples as it does; returns the log line saying how the export loads."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from data_prep.text_embeddings_meta import TextEmbeddings
    from pipeline.diffusion import text_to_image_pipeline

    transformer = denoiser.transformer
    model = type(transformer).from_config(transformer.config)
    model.load_state_dict({k.removeprefix("transformer."): v for k, v in state_dict.items()})
    model.eval()
    text_encoder, tokenizer, encoder = encoder_parts(text)
    pipe = text_to_image_pipeline.TextToImagePipeline(
        transformer=model,
        scheduler=scheduler,
        vae=AutoencoderKL.from_pretrained(vae_dir) if vae_dir is not None else None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        objective=objective,
        encoder=encoder,
    )
    cached = TextEmbeddings(text.path)
    loads: list[str] = []

    def add_captions(tmp: Path) -> None:
        folder = tmp / text_to_image_pipeline.CAPTIONS_DIR
        folder.mkdir()
        captions = [*cached.captions(), ""]
        (folder / "captions.json").write_text(json.dumps(captions), encoding="utf-8")
        arrays = dict(zip(("states", "mask", "pooled"), table_with_empty(cached), strict=True))
        save_file({k: np_to_torch(v) for k, v in arrays.items()}, folder / "embeddings.safetensors")
        pad_right_when_loaded(tmp / "tokenizer" / "tokenizer_config.json")
        loads.append(offer_plain_class(tmp, pipe, cached, text.config.dtype))

    save_pipeline(export_dir, pipe, Path(text_to_image_pipeline.__file__), config, add_captions)
    return loads[0]


def pad_right_when_loaded(path: Path) -> None:
    """Save the tokenizer's padding side (right, as the stage encoded) in its config: transformers
    does not, and a Llama tokenizer loads padding on the left."""
    if path.exists():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["padding_side"] = "right"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def offer_plain_class(folder: Path, pipe: Any, cached: Any, dtype: str) -> str:
    """Name PixArtAlphaPipeline in the export's model_index.json where it samples as `pipe`
    does (pipeline.diffusion.plain_pipeline says when); the line saying how the export loads."""
    import numpy as np

    from pipeline.diffusion import plain_pipeline as plain

    problem = plain.structural_problem(pipe)
    max_length = cached.meta.max_length
    if problem is None:
        from transformers import AutoTokenizer

        captions = cached.captions()
        rows = plain.probe_captions(captions)
        states, mask, _ = cached.states(np.asarray(rows, dtype=np.int64))
        empty = cached.empty()
        probe = (np.concatenate([states, empty[0]]), np.concatenate([mask, empty[1]]))
        texts = [captions[i] for i in rows] + [""]
        try:  # the tokenizer as the user loads it
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
            problem = plain.encoding_problem(pipe, tokenizer, texts, probe, max_length, dtype)
        except (OSError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problem = f"PixArtAlphaPipeline cannot encode prompts with this encoder ({first})"
    ours = "TextToImagePipeline.from_pretrained(export)"
    if problem is not None:
        return (
            f"export: load it with {ours} or DiffusionPipeline.from_pretrained(export, "
            f'custom_pipeline="text_to_image_pipeline", trust_remote_code=True); a plain '
            f"DiffusionPipeline.from_pretrained(export) does not load it because {problem}"
        )
    plain.name_plain_class(folder)
    return (
        f"export: DiffusionPipeline.from_pretrained(export) loads a {plain.PLAIN_CLASS}, which "
        f"samples as {ours} does when called with {plain.plain_call(pipe, max_length)}"
    )


def encoder_parts(text: Resolved) -> tuple[Any, Any, dict[str, Any]]:
    """(text encoder, tokenizer, the pipeline's `encoder` config) of the text_encode stage
    `text`: the model it encoded with, loaded as it loaded it, or none for the bag of words."""
    from data_prep.text_embeddings_meta import TextEmbeddings
    from pipeline.engine.locations import Location
    from pipeline.stages.text_encode_models import load_model, load_tokenizer

    cfg = text.config
    meta = TextEmbeddings(text.path).meta
    spec = {"max_length": cfg.max_length, "layer": cfg.layer, "dtype": cfg.dtype}
    if cfg.bag_of_words:
        return None, None, spec | {"kind": "bag-of-words", "dim": meta.dim}
    if isinstance(cfg.encoder, Location):
        path = cfg.encoder.resolved()
    else:  # an upstream language-model stage's export
        assert text.run_dir is not None
        path = text.run_dir / str(cfg.encoder) / EXPORT_DIR
    where = f"stages.{text.stage}"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model, pooled = load_model(path, config, where)
    return (
        model,
        load_tokenizer(path, meta.encoder.name, where),
        spec
        | {
            "kind": "model",
            "pooled_output": pooled,
        },
    )


def save_pipeline(
    export_dir: Path,
    pipe: Any,
    source: Path,
    config: dict[str, Any] | None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Save a diffusers pipeline with its `source` file, provenance.json (`config`, the resolved
    stage config, with the code and package versions) and what `extra(folder)` adds, into a
    temporary directory renamed into place: a crash never leaves half an export."""
    from pipeline.train.export import writing_export
    from pipeline.train.provenance import write_provenance

    tmp = export_dir.parent / f".{export_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    faults.point(export_dir.parent.name, "export_start")
    with writing_export(export_dir, tmp):  # a full disk: one line, the checkpoints kept
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(source, tmp / source.name)
        if extra is not None:
            extra(tmp)
        write_provenance(tmp, config)
    faults.point(export_dir.parent.name, "export_write")
    shutil.rmtree(export_dir, ignore_errors=True)
    tmp.rename(export_dir)


def np_to_torch(array: Any) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))
