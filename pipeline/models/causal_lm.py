"""Decoder-only language models from transformers configs: llama (default), gpt2, mixtral (MoE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ModelConfig", "build_causal_lm"]


def build_causal_lm(
    cfg: ModelConfig, vocab_size: int, max_seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> PreTrainedModel:
    """A freshly initialised transformers causal LM (uses the global torch seed)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig

    special = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if cfg.arch == "gpt2":
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
    shared = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size(),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "max_position_embeddings": max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "rope_theta": cfg.rope_theta,
        **special,
    }
    if cfg.arch == "mixtral":
        config = MixtralConfig(
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=True,  # the objective reads routing from every forward
            **shared,
        )
    else:
        config = LlamaConfig(**shared)
    return AutoModelForCausalLM.from_config(config)
