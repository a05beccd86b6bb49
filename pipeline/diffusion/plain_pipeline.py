"""Which of diffusers' own pipeline classes samples a text-to-image export as TextToImagePipeline
does, so that a plain `DiffusionPipeline.from_pretrained(export)` loads it without this project.

Only one fits, and only one configuration of ours: `PixArtAlphaPipeline` (tokenizer,
text_encoder, vae, transformer, scheduler: the component names TextToImagePipeline saves too)
for an `arch: pixart` model in latent space, trained with the DDPM objective (epsilon or v), on
the final output of a transformers text encoder whose `forward(input_ids, attention_mask)[0]`
is the per-token states (a T5 encoder, a causal LM's base model, a CLIP text model without
projection). Its loop is ours: the same noise draw, timesteps, scheduler steps, cross-attention
mask and guidance `uncond + scale * (cond - uncond)` against its encoding of "" (the empty
caption training dropped to). So the export's model_index.json names it, and
TextToImagePipeline still loads the same directory (`TextToImagePipeline.from_pretrained` or
`custom_pipeline=`, which do not read the class name). Where it does not fit, and why:

- mmdit: SD3Pipeline conditions on two CLIP text encoders and a T5 (penultimate CLIP states
  zero-padded and joined to T5's tokens, pooled = both CLIPs' pooled vectors); an MMDiT on one
  encoder's states has no diffusers class.
- pixel space: every diffusers text-to-image pipeline decodes its samples with a VAE.
- flow matching: PixArtAlphaPipeline's loop reads the scheduler's `init_noise_sigma` and calls
  `scale_model_input`, which FlowMatchEuler/Heun do not have.
- the bag of words, a hidden layer other than the last, a CLIP text model with projection (its
  first output is the pooled vector): no transformers model whose first output is our states.
- an encoding that does not reproduce the cached captions: PixArtAlphaPipeline lowercases and
  strips prompts (captions with capitals, for a cased tokenizer), and encodes "" through the
  model even where the tokenizer gives it no token (we store zeros for that caption).

The plain call should pass `max_sequence_length` (the text_encode stage's max_length: its
default 120 keeps tokens training cut, and overruns an encoder with fewer positions; padding is
masked, so a shorter prompt samples the same either way) and must pass
`use_resolution_binning=False` unless the latents are 32, 64 or 128 wide and the VAE downsamples
8x (the binning otherwise raises "Invalid sample size" or changes the size);
`clean_caption=False` matters only where bs4 and ftfy are installed (its cleaning rewrites
punctuation, URLs and more; without them it falls back to lowercasing and stripping).
diffusers warns on the plain load that it ignores `objective` and `encoder` (our settings).
With a float16 caption cache, the plain class's states are the encoder's float32 output and
TextToImagePipeline's are rounded to float16: equal images up to that rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PLAIN_CLASS = "PixArtAlphaPipeline"
BINNED_SIZES = (32, 64, 128)  # PixArtAlphaPipeline's aspect-ratio bins: 256, 512, 1024 px
PROBE_CAPTIONS = 8  # cached captions (and as many changed by lowercasing) encoded as a check
TOLERANCE = {"float32": 1e-4, "float16": 2e-3}  # states vs the cache, relative and absolute


def structural_problem(pipe: Any) -> str | None:
    """Why PixArtAlphaPipeline cannot take this TextToImagePipeline's components (None: it can,
    pending the encoding check)."""
    spec = pipe.config.encoder
    if type(pipe.transformer).__name__ != "PixArtTransformer2DModel":
        return (
            "an MMDiT has no diffusers class (SD3Pipeline conditions on two CLIP encoders and a T5)"
        )
    if pipe.vae is None:
        return "a pixel-space model has no diffusers class (they all decode with a VAE)"
    if pipe.config.objective != "ddpm":
        return (
            "PixArtAlphaPipeline cannot drive the flow-matching schedulers (no "
            "init_noise_sigma or scale_model_input)"
        )
    if spec["kind"] != "model" or pipe.text_encoder is None:
        return "the bag of words is no transformers model for PixArtAlphaPipeline's text_encoder"
    if spec.get("layer") is not None:
        return (
            f"PixArtAlphaPipeline takes the text encoder's final output, not layer {spec['layer']}"
        )
    if spec.get("pooled_output") == "text_embeds":
        return "a CLIP text model with projection gives PixArtAlphaPipeline its pooled vector"
    return None


def probe_captions(captions: list[str]) -> list[int]:
    """Rows of the cached captions to check: the first few, and the first few that
    PixArtAlphaPipeline's lowercasing and stripping would change."""
    changed = [i for i, text in enumerate(captions) if text.lower().strip() != text]
    return sorted(set(range(min(PROBE_CAPTIONS, len(captions)))) | set(changed[:PROBE_CAPTIONS]))


def encoding_problem(
    pipe: Any,
    tokenizer: Any,
    texts: list[str],
    cached: tuple[np.ndarray, np.ndarray],
    max_length: int,
    dtype: str,
) -> str | None:
    """Why PixArtAlphaPipeline's prompt encoding with `tokenizer` (as saved) does not give
    `texts` their cached (states [B, L, D], mask [B, L]); None where it does."""
    import torch
    from diffusers import PixArtAlphaPipeline
    from diffusers.utils import logging

    plain = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=pipe.transformer,
        scheduler=pipe.scheduler,
    )
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # not its warning on each caption the cache cut too
    try:
        with torch.inference_mode():
            states, mask, _, _ = plain.encode_prompt(
                texts,
                do_classifier_free_guidance=False,
                device=pipe.text_encoder.device,
                clean_caption=False,
                max_sequence_length=max_length,
            )
    finally:
        logging.set_verbosity(level)
    ours, real = mask.bool().cpu().numpy(), cached[1].astype(bool)
    theirs = states.float().cpu().numpy()
    tolerance = TOLERANCE[dtype]
    for row, text in enumerate(texts):
        # a caption with no token attends to all its (padding) states alike, so all must agree
        where = real[row] if real[row].any() else np.ones_like(real[row])
        close = np.allclose(
            theirs[row][where], cached[0][row][where].astype(np.float32), rtol=tolerance,
            atol=tolerance,
        )  # fmt: skip
        same_mask = np.array_equal(ours[row], real[row])
        if not same_mask or not close:
            return (
                f"PixArtAlphaPipeline encodes the caption {text!r} differently from the cache "
                f"({_why(text, same_mask, bool(real[row].any()))})"
            )
    return None


def _why(text: str, same_mask: bool, has_token: bool) -> str:
    """The likeliest reason PixArtAlphaPipeline's encoding of `text` is not the cached one."""
    if not has_token:
        return (
            "the tokenizer gives it no token: the cache holds zeros, the plain class would "
            "encode it"
        )
    if text.lower().strip() != text:
        return "the plain class lowercases and strips prompts"
    return "its tokenizer pads or cuts it differently" if not same_mask else "other states"


def plain_call(pipe: Any, max_length: int) -> str:
    """The plain call's arguments that sample as TextToImagePipeline does, as source text."""
    size = pipe.transformer.config.sample_size
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    binned = size in BINNED_SIZES and factor == 8
    binning = "" if binned else ", use_resolution_binning=False"
    return f"max_sequence_length={max_length}{binning}, clean_caption=False"


def name_plain_class(export: Path) -> None:
    """Make model_index.json name PixArtAlphaPipeline (TextToImagePipeline's config stays)."""
    path = export / "model_index.json"
    index = json.loads(path.read_text(encoding="utf-8"))
    index["_class_name"] = PLAIN_CLASS
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
