"""Language-model families as specs, and the `model:` block of a pretrain stage that picks one.

A family is one `FamilySpec` in `FAMILIES`, keyed by its transformers `model_type`: how its
transformers config is built, the Auto class that builds it and loads its export, the objective it
trains with, the special tokens its tokenizer gains and how eval scores it. `ModelConfig.arch`
accepts exactly the keys of `FAMILIES`. The schema and the builders share this module because each
needs the other: the schema lists the families, and every builder reads the schema.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Strict
from pipeline.engine.schema_errors import PathText
from pipeline.train.objectives import (
    CausalLM,
    MaskedLM,
    MoECausalLM,
    Objective,
    SpanCorruption,
    span_counts,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # fixed by data_prep.tokenizer (unk is 0)
MASK_TOKEN = "<mask>"
SENTINEL_TOKEN = "<extra_id_{}>"
DEFAULT_ARCH = "llama"  # also how eval treats an export of a model_type no spec names

ScoringKind = Literal["causal", "masked", "seq2seq"]


@dataclass(frozen=True)
class Scoring:
    """How eval scores an export; the families scored alike share one."""

    kind: ScoringKind  # causal: eval.lm's next-token loss, bits/byte, task accuracy and samples
    headline: str  # the metric eval's summary leads with
    # Clauses of the summary note, formatted with `name` and the metrics; a clause that names a
    # metric the model did not record is left out.
    notes: tuple[str, ...]
    renamed: dict[str, str] = field(default_factory=dict)  # recorded name -> objective metric
    kept_prefixes: tuple[str, ...] = ()  # objective metrics recorded under their own names
    records_windows: bool = False  # also record num_windows and seq_len of the scored windows

    def note(self, name: str, metrics: dict[str, Any]) -> str:
        """The summary clause of one model, from the clauses whose metrics it recorded."""
        values = {"name": name, **metrics}
        return "".join(
            clause.format(**values)
            for clause in self.notes
            if all(f in values for _, f, _, _ in string.Formatter().parse(clause) if f)
        )


CAUSAL = Scoring(
    kind="causal",
    headline="val_loss",
    notes=(
        "{name} val_loss {val_loss:.3f} nats/token vs unigram baseline {unigram_loss:.3f} "
        "(ratio {loss_vs_unigram:.2f}), {bits_per_byte:.3f} bits/byte",
        ", busiest expert {moe/max_expert_fraction:.1%} of routing",
    ),
    kept_prefixes=("moe/",),
)
MASKED = Scoring(
    kind="masked",
    headline="mlm_loss",
    notes=(
        "{name} masked-token loss {mlm_loss:.3f} nats, "
        "accuracy {masked_token_accuracy:.1%} on masked positions",
    ),
    renamed={"mlm_loss": "loss", "masked_token_accuracy": "mlm_accuracy"},
    records_windows=True,
)
SEQ2SEQ = Scoring(
    kind="seq2seq",
    headline="span_loss",
    notes=(
        "{name} span-corruption loss {span_loss:.3f} nats/target token, "
        "accuracy {span_accuracy:.1%}",
    ),
    renamed={"span_loss": "loss", "span_accuracy": "span_accuracy"},
    records_windows=True,
)


def no_special_tokens(cfg: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    """Families that use the tokenizer as it is."""
    return {}


@dataclass(frozen=True)
class FamilySpec:
    """Everything the pipeline knows about one language-model family."""

    # (cfg, model vocab incl. the added tokens, max_seq_len) -> a transformers config
    hf_config: Callable[[ModelConfig, int, int], PretrainedConfig]
    auto_class: str  # the transformers Auto class that builds the model and loads its export
    # (cfg, tokenizer vocab, model vocab, eos id or None) -> the training objective; the ids in
    # between the vocabs are the added special tokens; an eos id turns on document masking, which
    # only families with `document_mask_problem` None are given
    objective: Callable[[ModelConfig, int, int, int | None], Objective]
    scoring: Scoring
    loss_meaning: str  # what its loss is (compare's 'loss is'), formatted with cfg's fields
    fields: tuple[str, ...] = ()  # ModelConfig fields only this family reads
    gated_mlp: bool = False  # default MLP width ~8/3*hidden (gated SiLU), else 4*hidden
    # (cfg, max_seq_len) -> tokens appended to the exported tokenizer, as add_special_tokens takes
    special_tokens: Callable[[ModelConfig, int], dict[str, Any]] = no_special_tokens
    # ModelConfig field -> attribute of the exported config, to rebuild the objective from an
    # export whose stage config is not at hand
    export_fields: dict[str, str] = field(default_factory=dict)
    # Why the family cannot keep packed documents apart (document_mask), or None when it can:
    # its attention mask is transformers' create_causal_mask, which turns packed position_ids
    # into a block-causal mask (sdpa, eager; flash-attention varlen on GPU)
    document_mask_problem: str | None = None


def _decoder_kwargs(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> dict[str, Any]:
    """What llama-style decoders share, in their transformers names."""
    return {
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
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def llama_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """RoPE, SwiGLU, RMSNorm decoder."""
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder_kwargs(cfg, vocab_size, max_seq_len))


def qwen2_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """llama with biases on the query, key and value projections (full attention, no window)."""
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder_kwargs(cfg, vocab_size, max_seq_len))


def mixtral_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """llama whose MLPs are sparse mixtures of experts."""
    from transformers import MixtralConfig

    return MixtralConfig(
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=True,  # the objective reads routing from every forward
        **_decoder_kwargs(cfg, vocab_size, max_seq_len),
    )


def gpt2_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """Learned positions, GELU MLP, LayerNorm decoder."""
    from transformers import GPT2Config

    return GPT2Config(
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
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def bert_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """Bidirectional encoder; `vocab_size` includes the mask token."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size(),
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max_seq_len,
        type_vocab_size=1,  # one segment: pretraining windows are not sentence pairs
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
    )


def t5_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """Encoder-decoder with relative position buckets; `vocab_size` includes the sentinels."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.ffn_size(),
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout,
        feed_forward_proj=cfg.feed_forward_proj,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        decoder_start_token_id=PAD_ID,  # T5 starts decoding from the pad token
    )


def causal_objective(
    cfg: ModelConfig, vocab_size: int, model_vocab_size: int, eos_id: int | None
) -> Objective:
    """Next-token cross-entropy, documents kept apart at `eos_id` when given."""
    return CausalLM(eos_id)


def moe_objective(
    cfg: ModelConfig, vocab_size: int, model_vocab_size: int, eos_id: int | None
) -> Objective:
    """Next-token cross-entropy plus the router's load-balancing loss."""
    return MoECausalLM(cfg.experts_per_token, cfg.router_aux_loss_coef, eos_id)


def masked_objective(
    cfg: ModelConfig, vocab_size: int, model_vocab_size: int, eos_id: int | None
) -> Objective:
    """Masked-token cross-entropy; the mask token is the first id after the tokenizer's."""
    return MaskedLM(vocab_size, vocab_size, cfg.mlm_probability, PAD_ID)


def span_objective(
    cfg: ModelConfig, vocab_size: int, model_vocab_size: int, eos_id: int | None
) -> Objective:
    """Span corruption with sentinels vocab_size..model_vocab_size-1."""
    return SpanCorruption(
        sentinel_start=vocab_size,
        num_sentinels=model_vocab_size - vocab_size,
        noise_density=cfg.noise_density,
        mean_span_length=cfg.mean_span_length,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
    )


def mask_token(cfg: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    """bert's mask token."""
    return {"mask_token": MASK_TOKEN}


def sentinel_tokens(cfg: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    """One sentinel per span the longest window can have corrupted."""
    num_spans = span_counts(max_seq_len, cfg.noise_density, cfg.mean_span_length)[1]
    return {"additional_special_tokens": [SENTINEL_TOKEN.format(i) for i in range(num_spans)]}


CAUSAL_LM = "AutoModelForCausalLM"
NEXT_TOKEN_CE = "causal LM: next-token CE"

FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(
        llama_config, CAUSAL_LM, causal_objective, CAUSAL, NEXT_TOKEN_CE, gated_mlp=True
    ),
    "gpt2": FamilySpec(gpt2_config, CAUSAL_LM, causal_objective, CAUSAL, NEXT_TOKEN_CE),
    "mixtral": FamilySpec(
        mixtral_config,
        CAUSAL_LM,
        moe_objective,
        CAUSAL,
        "causal LM: next-token CE + {router_aux_loss_coef:g} x router balance loss",
        fields=("num_experts", "experts_per_token", "router_aux_loss_coef"),
        gated_mlp=True,
        export_fields={
            "num_experts": "num_local_experts",
            "experts_per_token": "num_experts_per_tok",
            "router_aux_loss_coef": "router_aux_loss_coef",
        },
    ),
    "bert": FamilySpec(
        bert_config,
        "AutoModelForMaskedLM",
        masked_objective,
        MASKED,
        "masked LM: CE on the {mlm_probability:.0%} chosen tokens",
        fields=("mlm_probability",),
        special_tokens=mask_token,
        document_mask_problem="is a masked LM: its attention is bidirectional over the window "
        "and its mask ignores position_ids",
    ),
    "t5": FamilySpec(
        t5_config,
        "AutoModelForSeq2SeqLM",
        span_objective,
        SEQ2SEQ,
        "span corruption: decoder CE on sentinels + spans + eos "
        "({noise_density:.0%} noise, mean span {mean_span_length:g})",
        fields=("noise_density", "mean_span_length", "num_decoder_layers", "feed_forward_proj"),
        special_tokens=sentinel_tokens,
        document_mask_problem="does span corruption: its encoder attends across the whole "
        "window and its relative positions ignore position_ids",
    ),
    "qwen2": FamilySpec(
        qwen2_config, CAUSAL_LM, causal_objective, CAUSAL, NEXT_TOKEN_CE, gated_mlp=True
    ),
}

Arch = Literal[tuple(FAMILIES)]  # the families, in FAMILIES order (the error lists them so)


class ModelConfig(Strict):
    """Architecture of a language model; sizes are per layer unless named otherwise."""

    path: PathText | None = Field(
        None,
        description="continue pretraining this Hugging Face model directory: weights and "
        "architecture come from it, so no other model field may be set",
    )
    arch: Arch = DEFAULT_ARCH
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(4, ge=1, description="decoder layers; encoder layers for bert and t5")
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = None  # grouped-query attention (llama-style); None = num_heads
    intermediate_size: int | None = None  # None = 4*hidden, or ~8/3*hidden rounded (gated MLPs)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    rope_theta: float = 10000.0
    # mixtral: sparse mixture of experts replacing every MLP
    num_experts: int = Field(4, ge=1)
    experts_per_token: int = Field(2, ge=1)
    router_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    # bert: masked language modelling
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="fraction of tokens predicted")
    # t5: span corruption
    noise_density: float = Field(0.15, gt=0, lt=1, description="fraction of tokens corrupted")
    mean_span_length: float = Field(3.0, ge=1, description="mean corrupted span, in tokens")
    num_decoder_layers: int | None = Field(None, ge=1, description="None = num_layers")
    feed_forward_proj: Literal["relu", "gated-gelu"] = "gated-gelu"

    def _changed(self, names: Iterable[str]) -> list[str]:
        """Fields among `names` that differ from their defaults (not model_fields_set: the
        resolved recipe.yaml spells out every default, and validates again in each worker)."""
        return [n for n in names if getattr(self, n) != type(self).model_fields[n].default]

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
        if self.path is not None and (
            both := self._changed(set(type(self).model_fields) - {"path"})
        ):
            raise ValueError(
                f"{', '.join(sorted(both))} conflict with path: the architecture comes from the "
                f"directory; remove them"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {kv}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token {self.experts_per_token} exceeds num_experts "
                f"{self.num_experts}; route each token to at most num_experts experts"
            )
        for arch, spec in FAMILIES.items():
            if stray := self._changed(spec.fields) if arch != self.arch else []:
                raise ValueError(
                    f"{', '.join(stray)} only applies to arch {arch}, not {self.arch}; remove it"
                )
        return self

    def ffn_size(self) -> int:
        """MLP width: explicit, ~8/3*hidden rounded up to 64 for gated MLPs, else 4*hidden."""
        if self.intermediate_size:
            return self.intermediate_size
        if not FAMILIES[self.arch].gated_mlp:
            return 4 * self.hidden_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)
