"""Model builders: every model is built from a config, never from downloaded weights.

`build_model` returns the model, the objective its family trains with, the Auto class its export
loads with, and any special tokens the exported tokenizer must gain (bert's mask token, t5's
sentinels). Those tokens take the ids right after the tokenizer's own: vocab_size, vocab_size + 1...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.models.config import ModelConfig
from pipeline.train.objectives import (
    CausalLM,
    MaskedLM,
    MoECausalLM,
    Objective,
    SpanCorruption,
    span_counts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # fixed by data_prep.tokenizer (unk is 0)
MASK_TOKEN = "<mask>"
SENTINEL_TOKEN = "<extra_id_{}>"
AUTO_CLASSES = {
    "llama": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "mixtral": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM",
    "t5": "AutoModelForSeq2SeqLM",
}


@dataclass
class BuiltModel:
    model: PreTrainedModel
    objective: Objective
    auto_class: str  # name in transformers, e.g. "AutoModelForCausalLM"
    # Tokens appended to the tokenizer at export, in id order starting at the tokenizer's size.
    added_special_tokens: dict[str, Any] = field(default_factory=dict)


def special_tokens_for(cfg: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    """The tokens `cfg.arch` adds to the tokenizer, as `tokenizer.add_special_tokens` takes them."""
    if cfg.arch == "bert":
        return {"mask_token": MASK_TOKEN}
    if cfg.arch == "t5":
        num_spans = span_counts(max_seq_len, cfg.noise_density, cfg.mean_span_length)[1]
        return {"additional_special_tokens": [SENTINEL_TOKEN.format(i) for i in range(num_spans)]}
    return {}


def _count_tokens(added: dict[str, Any]) -> int:
    """How many tokens an `add_special_tokens` mapping adds."""
    return sum(len(v) if isinstance(v, list) else 1 for v in added.values())


def build_objective(cfg: ModelConfig, vocab_size: int, model_vocab_size: int) -> Objective:
    """The objective of `cfg.arch`; ids vocab_size..model_vocab_size-1 are its added tokens."""
    if cfg.arch == "mixtral":
        return MoECausalLM(cfg.experts_per_token, cfg.router_aux_loss_coef)
    if cfg.arch == "bert":
        return MaskedLM(vocab_size, vocab_size, cfg.mlm_probability, PAD_ID)
    if cfg.arch == "t5":
        return SpanCorruption(
            sentinel_start=vocab_size,
            num_sentinels=model_vocab_size - vocab_size,
            noise_density=cfg.noise_density,
            mean_span_length=cfg.mean_span_length,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
        )
    return CausalLM()


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> BuiltModel:
    """A freshly initialised model of `cfg.arch` (uses the global torch seed)."""
    from pipeline.models.causal_lm import build_causal_lm
    from pipeline.models.encoders import build_masked_lm, build_seq2seq_lm

    added = special_tokens_for(cfg, max_seq_len)
    model_vocab_size = vocab_size + _count_tokens(added)
    if cfg.arch == "bert":
        model = build_masked_lm(cfg, model_vocab_size, max_seq_len, PAD_ID)
    elif cfg.arch == "t5":
        model = build_seq2seq_lm(cfg, model_vocab_size, EOS_ID, PAD_ID)
    else:
        model = build_causal_lm(cfg, vocab_size, max_seq_len, BOS_ID, EOS_ID, PAD_ID)
    objective = build_objective(cfg, vocab_size, model_vocab_size)
    return BuiltModel(model, objective, AUTO_CLASSES[cfg.arch], added)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, added: dict[str, Any]) -> None:
    """Add a model's special tokens to its tokenizer, failing if they do not get the model's ids."""
    first = len(tokenizer)
    tokenizer.add_special_tokens(added)
    tokens = [t for v in added.values() for t in (v if isinstance(v, list) else [v])]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first, first + len(tokens))):
        raise ValueError(
            f"special tokens {tokens} got ids {ids}, the model uses {first}..{first + len(tokens) - 1}"
            f"; the tokenizer already knew some of them"
        )
