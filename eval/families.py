"""Per-family evaluation: each export is scored with the objective its family trains with.

The family comes from the exported config's `model_type`, and its spec in
pipeline.models.families says how it is scored: causal LMs keep the next-token metrics of eval.lm
(mixtral adds its routing statistics), bert is scored by masked-token loss and accuracy, t5 by
span-corruption loss. Random masks and spans come from a fixed-seed generator,
so every evaluation of the same model on the same windows gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.engine.errors import PipelineError
from pipeline.models import build_objective
from pipeline.models.families import DEFAULT_ARCH, FAMILIES, FamilySpec, ModelConfig, ScoringKind

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.train.objectives import Objective

Family = ScoringKind  # how an export is scored: causal, masked or seq2seq
SCORING = {spec.scoring.kind: spec.scoring for spec in FAMILIES.values()}
HEADLINES: dict[Family, str] = {kind: scoring.headline for kind, scoring in SCORING.items()}
EVAL_SEED = 0  # masks and spans are the same in every evaluation

BatchProgress = Callable[[list[np.ndarray]], Iterable[np.ndarray]]


def spec_of(model_type: str) -> FamilySpec:
    """The spec of an export's `model_type`; one no spec names is treated as the default (llama)."""
    return FAMILIES.get(model_type, FAMILIES[DEFAULT_ARCH])


def family_of(model_type: str) -> Family:
    """How a model of `model_type` is scored; one no spec names is a causal LM."""
    return spec_of(model_type).scoring.kind


def load_model(export_dir: Path, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A stage's exported model (its family's Auto class, float32, eval mode) and tokenizer."""
    import torch
    import transformers

    if not (export_dir / "config.json").is_file():
        raise PipelineError(
            f"{export_dir}: no Hugging Face model export (config.json missing); "
            f"list only model stages (pretrain/sft/rlhf) under eval `models:`"
        )
    model_type = transformers.AutoConfig.from_pretrained(export_dir).model_type
    auto_class = getattr(transformers, spec_of(model_type).auto_class)
    model = auto_class.from_pretrained(export_dir, dtype=torch.float32).to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(export_dir)


def objective_for(stage_config: Any, hf_config: PretrainedConfig, vocab_size: int) -> Objective:
    """The objective the model trained with: its stage's `model:` block, else its HF config's."""
    model_cfg = getattr(stage_config, "model", None)
    if not isinstance(model_cfg, ModelConfig) or model_cfg.arch != hf_config.model_type:
        arch = hf_config.model_type if hf_config.model_type in FAMILIES else DEFAULT_ARCH
        fields = {
            name: getattr(hf_config, attr) for name, attr in FAMILIES[arch].export_fields.items()
        }
        model_cfg = ModelConfig(arch=arch, **fields)
    return build_objective(model_cfg, vocab_size, hf_config.vocab_size)


def objective_metrics(
    model: PreTrainedModel,
    objective: Objective,
    windows: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
) -> dict[str, float]:
    """Objective loss (`loss`) and metrics over windows (N, seq_len + 1), averaged per window."""
    import torch

    generator = torch.Generator().manual_seed(EVAL_SEED)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    totals: dict[str, float] = {}
    with torch.inference_mode():
        for batch in progress(batches) if progress else batches:
            tokens = torch.as_tensor(batch, dtype=torch.long, device=model.device)  # (B, T+1)
            loss, metrics = objective.loss(model, tokens, generator)
            for key, value in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(batch)
    return {key: total / len(windows) for key, total in totals.items()}


def family_metrics(
    family: Family, scored: dict[str, float], num_windows: int, seq_len: int
) -> dict[str, float]:
    """The recorded metrics of a non-causal family, or a causal model's extras (mixtral's routing)."""
    scoring = SCORING[family]
    metrics = {name: scored[key] for name, key in scoring.renamed.items()}
    if scoring.records_windows:
        metrics |= {"num_windows": num_windows, "seq_len": seq_len}
    kept = {k: v for k, v in scored.items() if k.startswith(scoring.kept_prefixes)}
    return metrics | kept


def summary_note(name: str, family: Family, metrics: dict[str, Any]) -> str:
    """One clause of the eval summary note, in the terms of the model's family."""
    return SCORING[family].note(name, metrics)


def learned_positions(config: dict[str, Any]) -> int | None:
    """The size of a model's learned position table (GPT-2's n_positions, BERT's
    max_position_embeddings), which a longer window indexes past; None for rotary, ALiBi and
    relative positions, which have no such end. `config` is a model's config.json."""
    if any(word in key for key in config for word in ("rope", "rotary", "alibi")):
        return None
    size = config.get("n_positions") or config.get("max_position_embeddings")
    return int(size) if size else None
