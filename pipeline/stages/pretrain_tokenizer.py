"""Which tokenizer a pretrain stage's model has and its export carries, and the plan's checks that
its tokens were encoded with it: a model directory's own (continued pretraining), a tokenizer the
tokenizer stage adopted (from scratch, with that tokenizer's special ids), or the tokenizer stage's
SentencePiece model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.tokenizer_meta import TokenizerMeta
from data_prep.tokens_meta import TokensMeta, tokenizers_differ
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import PlanView, Resolved
from pipeline.engine.locations import Location


def tokenizer_source(ctx: StageContext) -> Path:
    """The tokenizer the export carries: the model directory's own, else the tokenizer stage's."""
    cfg: Any = ctx.config
    if cfg.model.path is not None:
        return Path(cfg.model.path).expanduser().absolute()
    return ctx.input("tokenizer").path


def users_tokenizer(ctx: StageContext) -> bool:
    """Whether the export carries a user's tokenizer files (a model directory's, or one the
    tokenizer stage adopted) rather than the tokenizer stage's SentencePiece export."""
    if ctx.config.model.path is not None:  # type: ignore[attr-defined]
        return True
    return TokenizerMeta.read(ctx.input("tokenizer").path).adopted


def adopted_special_ids(ctx: StageContext, tokens: TokensMeta) -> dict[str, int | None] | None:
    """The special ids of a tokenizer the tokenizer stage adopted, as a model config names them
    (end of document ends generation; padding is it too when the tokenizer has no pad token)."""
    record = TokenizerMeta.read(ctx.input("tokenizer").path)
    if not record.adopted:
        return None
    pad = record.pad_id if record.pad_id is not None else tokens.eos_id
    return {"bos_token_id": record.bos_id, "eos_token_id": tokens.eos_id, "pad_token_id": pad}


def adopted_tokenizer_problems(view: PlanView) -> list[str]:
    """A family whose objective needs the tokenizer stage's own ids (bert's mask and t5's
    sentinels follow its vocabulary, padding is its <pad>) cannot start from an adopted one."""
    from pipeline.models.families import FAMILIES
    from pipeline.stages.base_model import adopts

    cfg: Any = view.config
    tokenizer = view.first("tokenizer")
    adopted = tokenizer is not None and adopts(tokenizer)
    if (
        cfg.model.path is not None
        or not adopted
        or FAMILIES[cfg.model.arch].scoring.kind == "causal"
    ):
        return []
    causal = ", ".join(name for name, spec in FAMILIES.items() if spec.scoring.kind == "causal")
    return [
        f"stages.{view.name}.model.arch: {cfg.model.arch} is pretrained from scratch on the "
        f"tokenizer stage's own SentencePiece ids, but {tokenizer.stage} adopts the tokenizer of "
        f"{tokenizer.config.tokenizer.path}; use a causal arch ({causal}) or train a tokenizer"
    ]


def tokens_tokenizer_problems(view: PlanView) -> list[str]:
    """Tokens encoded with another tokenizer than the one the model has (model.path) or its
    export carries (the tokenizer stage's), as far as the tokens' tokenize stage tells."""
    tokens, init = view.first("tokens"), view.first("model")
    if tokens is None:
        return []
    named = getattr(tokens.config, "tokenizer", None)  # a tokenize stage's `tokenizer:`
    fix = f"stages.{tokens.stage}.tokenizer"
    if init is None or init.location is None:
        if not isinstance(named, Location):
            return []
        return [
            f"stages.{view.name}: the tokens of {tokens.stage} are encoded with the tokenizer of "
            f"{named.path}, but a model pretrained from scratch exports a tokenizer stage's; set "
            f"model.path: {named.path} to continue that model, or give the tokenizer stage "
            f"tokenizer: {{path: {named.path}}} and remove {fix} to encode with it"
        ]
    model = init.location
    if isinstance(named, Location) and not tokenizers_differ(named.resolved(), model.resolved()):
        return []
    used = (
        f"the tokenizer of {named.path}"
        if isinstance(named, Location)
        else "a tokenizer stage's model"
    )
    return [
        f"stages.{view.name}.model.path: the tokens of {tokens.stage} are encoded with {used}, "
        f"not with the tokenizer of {model.path}; set {fix}: {{path: {model.path}}}"
    ]


def tokenizer_fix(ctx: StageContext, tokens: Resolved) -> str:
    """How to encode the tokens with the tokenizer this stage's export carries."""
    path = ctx.config.model.path  # type: ignore[attr-defined]
    if path is not None:
        return f"set stages.{tokens.label}.tokenizer: {{path: {path}}}"
    return f"set stages.{tokens.label}.tokenizer: {ctx.input('tokenizer').label}"
