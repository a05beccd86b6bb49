"""Decoder-only language models from transformers configs (llama by default, gpt2)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from pipeline.config import Strict

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ModelConfig(Strict):
    """Architecture of a decoder-only LM; sizes are per layer unless named otherwise."""

    arch: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # llama grouped-query attention; None = num_heads
    intermediate_size: int | None = None  # None = 4*hidden (gpt2) or ~8/3*hidden rounded (llama)
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {kv}")
        return self

    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.arch == "gpt2":
            return 4 * self.hidden_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)


def build_causal_lm(
    cfg: ModelConfig, vocab_size: int, max_seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> PreTrainedModel:
    """A freshly initialised transformers causal LM (uses the global torch seed)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    special = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_size(),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=max_seq_len,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_dropout=cfg.dropout,
            rope_theta=cfg.rope_theta,
            **special,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=cfg.hidden_size,
            n_inner=cfg.ffn_size(),
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_positions=max_seq_len,
            tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **special,
        )
    return AutoModelForCausalLM.from_config(config)
