"""The text encoders of the text_encode stage: a model directory's, or a hashed bag of words.

Every encoder maps a batch of captions to per-token states [B, L, D], a mask [B, L] and one
pooled vector [B, P] per caption, in float32, with L the stage's max_length:

- a causal LM (Llama, Qwen2, GPT-2, any `lm` stage's export) or an encoder-only model: its base
  model (`AutoModel`, without the LM head); pooled = the mean of the states over real tokens;
- an encoder-decoder (T5 and its kin, as PixArt and SD3 use): its encoder alone
  (`T5EncoderModel`, else `get_encoder()`); pooled = the masked mean;
- a CLIP text model (model_type clip or clip_text_model, as Stable Diffusion uses): pooled is the
  model's own: the projected `text_embeds` where it has a projection, else `pooler_output`;
- `builtin:bag-of-words`: no model; each lowercase word is a fixed random vector (a pure
  function of the word), the states are the words' vectors, pooled their mean. A baseline for
  the encoder comparison, and a conditioning that needs no download.

Captions are tokenized with the tokenizer's own special tokens, padded on the right to L with its
pad token (its eos where it has none: Llama, GPT-2), and cut at L. Models run frozen, in eval
mode, under inference_mode, in float32. A caption with no token (the empty caption of a
tokenizer that adds none) is all padding: its mask is all False and its states and pooled vector
are zeros (its row runs with one unmasked position, so no attention row is empty, then is
zeroed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.text_embeddings_meta import EncoderIdentity
from pipeline.engine.errors import PipelineError

BAG_OF_WORDS_DIM = 64
# model_type -> the class of an encoder-decoder's encoder alone (others load whole, then split)
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
CLIP_TYPES = ("clip", "clip_text_model")


@dataclass(frozen=True)
class Encoded:
    """A batch of captions encoded: float32 arrays, and which captions were cut."""

    states: np.ndarray  # float32 [B, L, D]
    mask: np.ndarray  # bool [B, L]
    pooled: np.ndarray  # float32 [B, P]
    truncated: np.ndarray  # bool [B]: longer than L tokens (words), cut


class BagOfWords:
    """Hashed bag-of-words: word -> a unit-scale random vector seeded by the word's SHA-256
    (text_to_image_pipeline.bag_of_words, which the export encodes new prompts with)."""

    def __init__(self, max_length: int, dim: int = BAG_OF_WORDS_DIM) -> None:
        self.max_length, self.dim = max_length, dim
        self.identity = EncoderIdentity(kind="bag-of-words", name="bag-of-words")

    def vector(self, word: str) -> np.ndarray:
        """float32 [dim], the same for a word in every run and recipe."""
        from pipeline.diffusion.text_to_image_pipeline import word_vector

        return word_vector(word, self.dim)

    def encode(self, texts: list[str]) -> Encoded:
        from pipeline.diffusion.text_to_image_pipeline import bag_of_words

        return Encoded(*bag_of_words(texts, self.max_length, self.dim))


class HFTextEncoder:
    """A Hugging Face model directory's text encoder and tokenizer (see the module docstring);
    it encodes with text_to_image_pipeline.encode_with_model, as the export does."""

    def __init__(
        self, path: Path, identity: EncoderIdentity, max_length: int, layer: int | None, where: str
    ) -> None:
        import torch

        self.path, self.max_length, self.layer, self.where = path, max_length, layer, where
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.model, self.pooled_output = load_model(path, config, where)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path, identity.name, where)
        self.identity = identity.model_copy(
            update={
                "model_type": config.get("model_type"),
                "model_class": type(self.model).__name__,
                "layer": layer,
            }
        )

    def encode(self, texts: list[str]) -> Encoded:
        from pipeline.diffusion.text_to_image_pipeline import encode_with_model

        args = (self.model, self.tokenizer, texts, self.max_length, self.layer, self.pooled_output)
        try:
            return Encoded(*encode_with_model(*args))
        except ValueError as exc:
            named = str(exc).replace("the model", self.identity.name)
            raise PipelineError(f"{self.where}.layer: {named}; pick one of them") from None


def load_model(path: Path, config: dict[str, Any], where: str) -> tuple[Any, str | None]:
    """(the text encoder of a model directory in float32, the name of its pooled output or None
    for a masked mean)."""
    import torch
    import transformers

    model_type = config.get("model_type")
    pooled: str | None = None
    if model_type in CLIP_TYPES:
        projected = model_type == "clip" or "CLIPTextModelWithProjection" in config.get(
            "architectures", []
        )
        name = "CLIPTextModelWithProjection" if projected else "CLIPTextModel"
        pooled = "text_embeds" if projected else "pooler_output"
    else:  # T5 kin by type: an encoder saved alone says is_encoder_decoder: false
        name = ENCODER_CLASSES.get(str(model_type), "AutoModel")
    try:
        model = getattr(transformers, name).from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"{where}.encoder: cannot load a text encoder from {path} ({first}); give a causal "
            f"LM, T5 or CLIP text model directory"
        ) from None
    if config.get("is_encoder_decoder") and name == "AutoModel":
        model = model.get_encoder()  # BART and kin: the decoder is dropped
    return model, pooled


def load_tokenizer(path: Path, label: str, where: str) -> Any:
    """The directory's tokenizer, padding on the right with its pad token (else its eos)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"{where}.encoder: cannot load the tokenizer of {label} ({first}); put the model's "
            f"tokenizer files beside its weights"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError(
                f"{where}.encoder: the tokenizer of {label} has neither a pad nor an eos token, "
                f"so captions cannot be padded; add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
