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

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.text_embeddings_meta import EncoderIdentity
from pipeline.engine.errors import PipelineError

BAG_OF_WORDS_DIM = 64
WORD = re.compile(r"\w+")
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
    """Hashed bag-of-words: word -> a unit-scale random vector seeded by the word's SHA-256."""

    def __init__(self, max_length: int, dim: int = BAG_OF_WORDS_DIM) -> None:
        self.max_length, self.dim = max_length, dim
        self.identity = EncoderIdentity(kind="bag-of-words", name="bag-of-words")
        self._vectors: dict[str, np.ndarray] = {}

    def vector(self, word: str) -> np.ndarray:
        """float32 [dim], the same for a word in every run and recipe."""
        if word not in self._vectors:
            seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big")
            draw = np.random.default_rng(seed).standard_normal(self.dim) / np.sqrt(self.dim)
            self._vectors[word] = draw.astype(np.float32)
        return self._vectors[word]

    def encode(self, texts: list[str]) -> Encoded:
        count, length = len(texts), self.max_length
        states = np.zeros((count, length, self.dim), np.float32)
        mask = np.zeros((count, length), bool)
        truncated = np.zeros(count, bool)
        for row, text in enumerate(texts):
            words = WORD.findall(text.lower())
            truncated[row] = len(words) > length
            for position, word in enumerate(words[:length]):
                states[row, position] = self.vector(word)
                mask[row, position] = True
        return Encoded(states, mask, masked_mean(states, mask), truncated)


def masked_mean(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, D]: the mean of states [B, L, D] over positions where mask [B, L]; zeros for none."""
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
    return (states * mask[..., None]).sum(axis=1) / counts


class HFTextEncoder:
    """A Hugging Face model directory's text encoder and tokenizer (see the module docstring)."""

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
        import torch

        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )  # fmt: skip
        mask = batch["attention_mask"].bool()
        empty = ~mask.any(dim=1)
        attention = mask.clone()
        attention[empty, 0] = True  # a caption with no token: one position, zeroed below
        with torch.inference_mode():
            out = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=attention.long().to(self.device),
                output_hidden_states=self.layer is not None,
            )
        states = (out.last_hidden_state if self.layer is None else self._layer(out)).float().cpu()
        if self.pooled_output is None:
            pooled = masked_mean(states.numpy(), mask.numpy())
        else:
            pooled = getattr(out, self.pooled_output).float().cpu().numpy()
        states_np = states.numpy().copy()
        states_np[empty.numpy()] = 0.0
        pooled[empty.numpy()] = 0.0
        truncated = np.asarray(lengths) > self.max_length
        return Encoded(states_np, mask.numpy(), pooled, truncated)

    def _layer(self, out: Any) -> Any:
        hidden = out.hidden_states  # (embeddings, block 1, ..., block n)
        if not -len(hidden) <= self.layer < len(hidden):  # type: ignore[operator]
            raise PipelineError(
                f"{self.where}.layer: {self.layer}, but {self.identity.name} has hidden states "
                f"0..{len(hidden) - 1} (0: embeddings; -1: the last block); pick one of them"
            )
        return hidden[self.layer]


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
