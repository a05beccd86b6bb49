"""The model a post-training stage starts from: an upstream stage's export or a user's directory.

A directory the user downloaded (SmolLM2, Qwen2.5, Llama...) keeps what makes it that model: its
own tokenizer files and chat template (ours is used only when it has none), its end-of-turn token,
its tied embeddings. Weights load as fp32 master weights whatever dtype they are stored in; the
trainers compute in bf16 where the hardware has it (`precision`). LoRA adapters come from peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Recipe, Strict
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, Resolved, resolve_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class AdapterConfig(Strict):
    """A LoRA adapter trained in place of the full weights (peft); the export holds both the
    adapter and the merged model."""

    kind: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="rank of the update matrices")
    alpha: float = Field(32, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names (suffixes, e.g. q_proj, v_proj) to adapt, or all-linear",
    )
    modules_to_save: list[str] = Field(
        [], description="modules trained in full beside the adapter (e.g. lm_head, embed_tokens)"
    )
    quantize: Literal["none", "nf4"] = Field(
        "none", description="nf4: QLoRA, the frozen base in 4 bits (bitsandbytes, CUDA only)"
    )

    @model_validator(mode="after")
    def _targets(self) -> AdapterConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty; name modules or use all-linear")
        return self

    def peft_config(self, task_type: str) -> Any:
        """The peft LoraConfig for a model of `task_type` (CAUSAL_LM or SEQ_CLS)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save or None,
            task_type=task_type,
        )


# The model a post-training stage starts from (its `model:` field, else the nearest LM stage).
MODEL_INPUT = Input("model", ("lm",), field="model", location="model")


def base_model(ctx: StageContext) -> Resolved:
    """The model this stage starts from: an upstream stage's export or the user's directory."""
    return ctx.input("model")


def model_problems(view: PlanView) -> list[str]:
    """What a plan can know of the model a stage starts from: its chat template file exists, its
    adapter names modules it has and can be quantised here."""
    cfg = view.config
    where = f"stages.{view.name}"
    problems = []
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        problems.append(
            f"{where}.chat_template {cfg.chat_template}: no such file; give a Jinja template file"
        )
    source = view.first("model")
    if cfg.adapter is not None:
        problems += [p for p in [quantize_problem(cfg.adapter, where)] if p]
        if source is not None and source.external:
            problems += [p for p in [target_problem(cfg.adapter, source.path, where)] if p]
    if source is not None and (problem := length_problem(cfg, source, where)):
        problems.append(problem)
    return problems


def length_problem(cfg: Any, source: Resolved, where: str) -> str | None:
    """Rows longer than the model's learned position table (GPT-2's) fail in its first forward."""
    from eval.lm import position_limit

    limit = position_limit(source)
    # sft and reward rows, and DPO's; GRPO/RLOO rows are a prompt and max_completion_length
    length = getattr(cfg, "max_length", None) if getattr(cfg, "algorithm", "dpo") == "dpo" else None
    if limit is None or length is None or length <= limit:
        return None
    return (
        f"{where}.max_length: {length} tokens per row, but {source.label} has learned positions "
        f"for {limit}; use max_length: {limit} or less"
    )


def peft_config(cfg: Any, task_type: str = "CAUSAL_LM", model: Any = None) -> dict[str, Any]:
    """The trainer keyword for the stage's adapter: none without one, nor for a `model` that
    is already a peft model (loaded sharded with its adapter, pipeline.train.trl_load)."""
    if cfg.adapter is None:
        return {}
    from peft import PeftModel

    return (
        {} if isinstance(model, PeftModel) else {"peft_config": cfg.adapter.peft_config(task_type)}
    )


def quantize_problem(adapter: AdapterConfig, where: str) -> str | None:
    """Why the adapter's quantisation cannot run on this machine, or None."""
    import importlib.util

    import torch

    if adapter.quantize != "nf4":
        return None
    missing = [
        what
        for what, there in (
            ("a CUDA GPU", torch.cuda.is_available()),
            ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
        )
        if not there
    ]
    if not missing:
        return None
    return (
        f"{where}.adapter.quantize: nf4 (QLoRA) needs {' and '.join(missing)}, which this machine "
        f"lacks; use quantize: none (plain LoRA), or run on a GPU node with bitsandbytes"
    )


def target_problem(adapter: AdapterConfig, model_dir: Path, where: str) -> str | None:
    """Why the adapter's module names do not fit the model in `model_dir` (checked on a
    meta-device copy built from its config, so no weight is loaded), or None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.engine.schema_errors import suggest

    names = _module_names(model_dir, AutoConfig, AutoModelForCausalLM)
    if names is None:
        return None
    wanted = [] if adapter.target_modules == "all-linear" else adapter.target_modules
    for field, targets in (
        ("target_modules", wanted),
        ("modules_to_save", adapter.modules_to_save),
    ):
        for target in targets:
            if not any(n == target or n.endswith(f".{target}") for n in names):
                suffixes = sorted(
                    {n.rsplit(".", 1)[-1] for n in names if n and not n[-1].isdigit()}
                )
                return (
                    f"{where}.adapter.{field}: {target!r} names no module of the model"
                    f"{suggest(target, suffixes)} (its modules: {', '.join(suffixes)})"
                )
    return None


def _module_names(model_dir: Path, auto_config: Any, auto_model: Any) -> set[str] | None:
    """The model's module names, from a meta-device instance of its config."""
    import torch

    try:
        config = auto_config.from_pretrained(model_dir)
        with torch.device("meta"):
            model = auto_model.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return {name for name, _ in model.named_modules()}


def load_tokenizer(source: Resolved, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a chat template and a pad token.

    Its own chat template is kept; ours (pipeline.stages.chat) only when it has none; a
    `chat_template` file overrides both. Special tokens written as text (the EOS TRL appends to
    completions, the template's end of turn) are parsed as the tokens themselves.
    """
    from transformers import AutoTokenizer

    from pipeline.stages.chat import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(source.path, split_special_tokens=False)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    source: Resolved, where: str, adapter: AdapterConfig | None = None, args: Any = None
) -> PreTrainedModel:
    """The causal LM of `source` with fp32 master weights (bf16 or fp16 files are upcast), or,
    for QLoRA (`adapter.quantize: nf4`), its frozen base in 4 bits with bf16 compute.

    Under a ZeRO-3 or FSDP2 launch of several ranks (`args`, the trainer's arguments, made
    first), it is sharded as it is built and streamed in from the files (trl_load): no rank
    holds the whole model. The nf4 path needs CUDA and bitsandbytes (the plan refuses it
    elsewhere); it has not run on this project's CPU-only machines."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.train.distributed import hf_zero3_off
    from pipeline.train.trl_load import load_for_trainer

    quantize = adapter is not None and adapter.quantize == "nf4"
    sharded = None if quantize else load_for_trainer(source.path, args, adapter)
    if sharded is not None:
        return sharded  # type: ignore[return-value]
    quantized: dict[str, Any] = {}
    if quantize:
        from transformers import BitsAndBytesConfig

        quantized = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "dtype": torch.bfloat16,
        }
    try:
        with hf_zero3_off():  # one process: whole (DeepSpeed partitions at initialize)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, **({"dtype": torch.float32} | quantized)
            )
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise PipelineError(
            f"{where}: cannot load a causal LM from {source.path} ({first}); give a Hugging "
            f"Face causal-LM directory"
        ) from None
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def causal_lm_twin(source: Resolved) -> PreTrainedModel:
    """`source`'s causal LM on the meta device, built from its config alone: what the trainer's
    arguments are made from (the layers FSDP wraps) before the weights load."""
    from pipeline.train.sharded_load import causal_lm_from_config, on_meta

    return on_meta(lambda: causal_lm_from_config(source.path))  # type: ignore[return-value]


def keep_tokenizer_files(source: Path, export_dir: Path, chat_template: str | None) -> None:
    """Put the source model's tokenizer files into an export byte for byte (replacing what
    save_pretrained wrote). `chat_template` (the text trained with: an override, or ours for a
    model that has none) is written beside them as chat_template.jinja."""
    from pipeline.train.tokenizer_files import copy_tokenizer_files

    copy_tokenizer_files(source, export_dir)
    if chat_template is not None:
        (export_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def has_chat_template(model_dir: Path) -> bool:
    """Whether a model directory's tokenizer brings a chat template of its own."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and bool(
        json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    )


def exported_template(
    source: Resolved, tokenizer: PreTrainedTokenizerBase, override: str | None
) -> str | None:
    """The chat template an export of a user's model adds to its tokenizer files: the override
    file, or the one trained with when the model has none (else None: its own is kept)."""
    if override is not None:
        return Path(override).read_text(encoding="utf-8")
    template = tokenizer.chat_template
    return None if has_chat_template(source.path) or not isinstance(template, str) else template


def adopts(tokenizer: Resolved) -> bool:
    """Whether a tokenizer stage adopts a user's tokenizer (`tokenizer: {path: DIR}`)."""
    return getattr(tokenizer.config, "tokenizer", None) is not None


def from_user_model(recipe: Recipe, source: Resolved) -> bool:
    """Whether `source` is a user's model directory, or the export of a stage that started from
    one (directly or through other stages), or pretrained from scratch on a tokenizer the
    tokenizer stage adopted: its tokenizer files are then the user's, and an export made from it
    keeps them as they are."""
    seen: set[str] = set()
    while source.stage is not None and source.stage not in seen:
        seen.add(source.stage)
        resolved, _ = resolve_inputs(recipe, source.stage)
        starts = resolved.get("model") or []
        if not starts:
            tokenizer = (resolved.get("tokenizer") or [None])[0]  # pretrained from scratch
            return tokenizer is not None and tokenizer.kind == "tokenizer" and adopts(tokenizer)
        source = starts[0]
    return source.external
