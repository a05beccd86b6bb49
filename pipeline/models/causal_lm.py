"""Decoder-only language models (llama, gpt2, mixtral, qwen2) with the caller's special ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.families import FAMILIES, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ModelConfig", "build_causal_lm"]


def build_causal_lm(
    cfg: ModelConfig, vocab_size: int, max_seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> PreTrainedModel:
    """A freshly initialised transformers model of `cfg.arch` (uses the global torch seed)."""
    import transformers

    spec = FAMILIES[cfg.arch]
    config = spec.hf_config(cfg, vocab_size, max_seq_len)
    config.update({"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    return getattr(transformers, spec.auto_class).from_config(config)
