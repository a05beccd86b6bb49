"""Models with a bidirectional encoder: bert (masked LM) and t5 (encoder-decoder, span corruption)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def build_masked_lm(
    cfg: ModelConfig, model_vocab_size: int, max_seq_len: int, pad_id: int
) -> PreTrainedModel:
    """A freshly initialised BertForMaskedLM; `model_vocab_size` includes the mask token."""
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(
        vocab_size=model_vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size(),
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max_seq_len,
        type_vocab_size=1,  # one segment: pretraining windows are not sentence pairs
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
    )
    return AutoModelForMaskedLM.from_config(config)


def build_seq2seq_lm(
    cfg: ModelConfig, model_vocab_size: int, eos_id: int, pad_id: int
) -> PreTrainedModel:
    """A freshly initialised T5ForConditionalGeneration; `model_vocab_size` includes sentinels."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    config = T5Config(
        vocab_size=model_vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.ffn_size(),
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout,
        feed_forward_proj=cfg.feed_forward_proj,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,  # T5 starts decoding from the pad token
    )
    return AutoModelForSeq2SeqLM.from_config(config)
