"""The `model:` block of a pretrain stage: one architecture from each family, sized per layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Strict

Arch = Literal["llama", "gpt2", "mixtral", "bert", "t5"]

# Fields that only one family reads; setting one for another arch is a mistake, not a no-op.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_experts", "experts_per_token", "router_aux_loss_coef"),
    "bert": ("mlm_probability",),
    "t5": ("noise_density", "mean_span_length", "num_decoder_layers", "feed_forward_proj"),
}


class ModelConfig(Strict):
    """Architecture of a language model; sizes are per layer unless named otherwise."""

    arch: Arch = "llama"
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(4, ge=1, description="decoder layers; encoder layers for bert and t5")
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = None  # llama/mixtral grouped-query attention; None = num_heads
    intermediate_size: int | None = None  # None = 4*hidden, or ~8/3*hidden rounded (llama/mixtral)
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

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
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
        for arch, names in FAMILY_FIELDS.items():
            # Compare with defaults, not model_fields_set: the resolved recipe.yaml spells out
            # every default, and it must validate again in each worker process.
            stray = (
                [n for n in names if getattr(self, n) != type(self).model_fields[n].default]
                if arch != self.arch
                else []
            )
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only applies to arch {arch}, not {self.arch}; remove it"
                )
        return self

    def ffn_size(self) -> int:
        """MLP width: explicit, 4*hidden (gpt2, bert, t5), or ~8/3*hidden for gated SiLU MLPs."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.arch in ("gpt2", "bert", "t5"):
            return 4 * self.hidden_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)
