"""Per-family evaluation: each export is scored with the objective its family trains with.

The family comes from the exported config's `model_type`: causal LMs keep the next-token metrics
of eval.lm (mixtral adds its routing statistics), bert is scored by masked-token loss and
accuracy, t5 by span-corruption loss. Random masks and spans come from a fixed-seed generator,
so every evaluation of the same model on the same windows gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.engine.errors import PipelineError
from pipeline.models import AUTO_CLASSES, build_objective
from pipeline.models.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.train.objectives import Objective

Family = Literal["causal", "masked", "seq2seq"]
HEADLINES: dict[Family, str] = {"causal": "val_loss", "masked": "mlm_loss", "seq2seq": "span_loss"}
EVAL_SEED = 0  # masks and spans are the same in every evaluation

BatchProgress = Callable[[list[np.ndarray]], Iterable[np.ndarray]]


def family_of(model_type: str) -> Family:
    """How a model of `model_type` is scored; anything not bert or t5 is a causal LM."""
    auto_class = AUTO_CLASSES.get(model_type, "AutoModelForCausalLM")
    if auto_class == "AutoModelForMaskedLM":
        return "masked"
    return "seq2seq" if auto_class == "AutoModelForSeq2SeqLM" else "causal"


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
    auto_class = getattr(transformers, AUTO_CLASSES.get(model_type, "AutoModelForCausalLM"))
    model = auto_class.from_pretrained(export_dir, dtype=torch.float32).to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(export_dir)


def objective_for(stage_config: Any, hf_config: PretrainedConfig, vocab_size: int) -> Objective:
    """The objective the model trained with: its stage's `model:` block, else its HF config's."""
    model_cfg = getattr(stage_config, "model", None)
    if not isinstance(model_cfg, ModelConfig) or model_cfg.arch != hf_config.model_type:
        routing = {}
        if hf_config.model_type == "mixtral":
            routing = {
                "num_experts": hf_config.num_local_experts,
                "experts_per_token": hf_config.num_experts_per_tok,
                "router_aux_loss_coef": hf_config.router_aux_loss_coef,
            }
        arch = hf_config.model_type if hf_config.model_type in AUTO_CLASSES else "llama"
        model_cfg = ModelConfig(arch=arch, **routing)
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
                totals[key] = totals.get(key, 0.0) + value * len(batch)
    return {key: total / len(windows) for key, total in totals.items()}


def family_metrics(
    family: Family, scored: dict[str, float], num_windows: int, seq_len: int
) -> dict[str, float]:
    """The recorded metrics of a non-causal family, or a causal model's extras (mixtral's routing)."""
    if family == "masked":
        return {
            "mlm_loss": scored["loss"],
            "masked_token_accuracy": scored["mlm_accuracy"],
            "num_windows": num_windows,
            "seq_len": seq_len,
        }
    if family == "seq2seq":
        return {
            "span_loss": scored["loss"],
            "span_accuracy": scored["span_accuracy"],
            "num_windows": num_windows,
            "seq_len": seq_len,
        }
    return {key: value for key, value in scored.items() if key.startswith("moe/")}


def summary_note(name: str, family: Family, metrics: dict[str, Any]) -> str:
    """One clause of the eval summary note, in the terms of the model's family."""
    if family == "masked":
        return (
            f"{name} masked-token loss {metrics['mlm_loss']:.3f} nats, "
            f"accuracy {metrics['masked_token_accuracy']:.1%} on masked positions"
        )
    if family == "seq2seq":
        return (
            f"{name} span-corruption loss {metrics['span_loss']:.3f} nats/target token, "
            f"accuracy {metrics['span_accuracy']:.1%}"
        )
    note = (
        f"{name} val_loss {metrics['val_loss']:.3f} nats/token vs unigram baseline "
        f"{metrics['unigram_loss']:.3f} (ratio {metrics['loss_vs_unigram']:.2f}), "
        f"{metrics['bits_per_byte']:.3f} bits/byte"
    )
    if "moe/max_expert_fraction" in metrics:
        note += f", busiest expert {metrics['moe/max_expert_fraction']:.1%} of routing"
    return note
