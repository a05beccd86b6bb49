"""Model builders: every model is built from a config, or loaded from a model directory to
continue pretraining it (`load_pretrained`).

`build_model` returns the model, the objective its family trains with, the Auto class its export
loads with, and any special tokens the exported tokenizer must gain (bert's mask token, t5's
sentinels). Those tokens take the ids right after the tokenizer's own: vocab_size, vocab_size + 1...
Each family is one spec in `pipeline.models.families.FAMILIES`; everything here is a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.models.families import DEFAULT_ARCH, FAMILIES, ModelConfig

# The tokenizer stage's special pieces (ids 0-3 of every SentencePiece model we train).
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.train.objectives import Objective


@dataclass
class BuiltModel:
    model: PreTrainedModel
    objective: Objective
    auto_class: str  # name in transformers, e.g. "AutoModelForCausalLM"
    # Tokens appended to the tokenizer at export, in id order starting at the tokenizer's size.
    added_special_tokens: dict[str, Any] = field(default_factory=dict)


def special_tokens_for(cfg: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    """The tokens `cfg.arch` adds to the tokenizer, as `tokenizer.add_special_tokens` takes them."""
    return FAMILIES[cfg.arch].special_tokens(cfg, max_seq_len)


def _count_tokens(added: dict[str, Any]) -> int:
    """How many tokens an `add_special_tokens` mapping adds."""
    return sum(len(v) if isinstance(v, list) else 1 for v in added.values())


def build_objective(cfg: ModelConfig, vocab_size: int, model_vocab_size: int) -> Objective:
    """The objective of `cfg.arch`; ids vocab_size..model_vocab_size-1 are its added tokens."""
    return FAMILIES[cfg.arch].objective(cfg, vocab_size, model_vocab_size, None)


def document_mask_problem(arch: str) -> str | None:
    """Why `arch` cannot train with document masking, and the fix; None when it can."""
    problem = FAMILIES[arch].document_mask_problem
    if problem is None:
        return None
    able = ", ".join(name for name, spec in FAMILIES.items() if spec.document_mask_problem is None)
    return (
        f"arch {arch} {problem}, so packed documents would attend to each other; "
        f"set document_mask: false or use one of: {able}"
    )


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    max_seq_len: int,
    document_eos_id: int | None = None,
    special_ids: dict[str, int | None] | None = None,
) -> BuiltModel:
    """A freshly initialised model of `cfg.arch` (uses the global torch seed).

    `document_eos_id` turns on document masking: attention and positions restart after it.
    `special_ids` (bos_token_id, eos_token_id, pad_token_id) are those of an adopted tokenizer;
    by default the tokenizer stage's SentencePiece ids.
    """
    import transformers

    spec = FAMILIES[cfg.arch]
    if document_eos_id is not None and (problem := document_mask_problem(cfg.arch)):
        raise ValueError(problem)  # recipe validation refuses this first
    added = spec.special_tokens(cfg, max_seq_len)
    model_vocab_size = vocab_size + _count_tokens(added)
    config = spec.hf_config(cfg, model_vocab_size, max_seq_len)
    for name, value in (special_ids or {}).items():
        setattr(config, name, value)
    model = getattr(transformers, spec.auto_class).from_config(config)
    objective = spec.objective(cfg, vocab_size, model_vocab_size, document_eos_id)
    return BuiltModel(model, objective, spec.auto_class, added)


def describe_pretrained(
    path: Path, model: PreTrainedModel, document_eos_id: int | None = None
) -> tuple[BuiltModel, ModelConfig]:
    """A model directory's causal LM (`model`, built from its config; the weights are streamed
    in by the training loop) with its objective, and the ModelConfig that describes it (for the
    objective and the FLOP count)."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path)
    arch = hf_config.model_type if hf_config.model_type in FAMILIES else DEFAULT_ARCH
    spec = FAMILIES[arch]
    if spec.scoring.kind != "causal":
        raise ValueError(
            f"model.path {path}: continued pretraining takes causal LMs, this is {arch}"
        )
    fields = {name: getattr(hf_config, attr) for name, attr in spec.export_fields.items()}
    heads = hf_config.num_attention_heads
    cfg = ModelConfig(
        arch=arch,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        **fields,
    )
    vocab = model.get_input_embeddings().num_embeddings
    objective = spec.objective(cfg, vocab, vocab, document_eos_id)
    return BuiltModel(model, objective, spec.auto_class), cfg


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


def unmatch_special_tokens(path: Path) -> None:
    """Drop the special tokens from tokenizer.json's `added_tokens`, so that `tokenizers` alone
    (serving engines) encodes a literal `<pad>` in text as text, as SentencePiece does.

    tokenizers matches every added token in raw text and has no serialised switch against it
    (`encode_special_tokens` is not saved). The tokens keep their ids as pieces of the model's
    vocab; transformers re-adds them from tokenizer_config.json (split_special_tokens keeps them
    text there too). The cost: `tokenizers` alone no longer skips them in decode.
    """
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    specials = set(SENTENCEPIECE_SPECIALS)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in specials]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
