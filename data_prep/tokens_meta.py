"""The tokenize stage's hand-off record (meta.json) and the identity of the tokenizer behind it.

Token shards are only meaningful next to the tokenizer that made them: id 17 is a different
piece in every vocabulary. `TokensMeta.tokenizer_id` names that tokenizer by a hash of its
id -> token mapping, so a model directory whose tokenizer differs (continued pretraining of a
user's model, evaluating one) is refused instead of being trained or scored on noise.

The identity covers the ids below the tokens' vocab_size only. A model this pipeline trained
carries the tokenizer stage's tokenizer plus, for some families, special tokens appended after
it (bert's mask, t5's sentinels): those never occur in the shards, so they do not change what
the shards mean. Two tokenizers with the same mapping but different merges or normalisation
share an identity: the check is of the vocabulary, not of how text is split into it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, read_record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

META_FILE = "meta.json"
OPTIONAL = ("mixture", "tokenizer_id", "tokenizer_path")


class SplitCounts(BaseModel):
    """Tokens and documents written to one split."""

    num_tokens: int
    num_documents: int


class MixtureSource(BaseModel):
    """One source of a mixture and its counts (data_prep.mixture adds more fields per kind)."""

    model_config = ConfigDict(extra="allow")

    name: str


class MixtureRecord(BaseModel):
    """Which runs of the val token stream came from which source ([end, source index] pairs)."""

    model_config = ConfigDict(extra="allow")

    kind: str
    sources: list[MixtureSource]
    val_runs: list[tuple[int, int]] = []


class TokensMeta(BaseModel):
    """What a tokenize export's shards are: vocabulary, separator, dtype, counts and tokenizer.

    Exports written before the tokenizer was recorded read with tokenizer_id None (unchecked).
    """

    model_config = ConfigDict(extra="ignore")

    vocab_size: int
    eos_id: int  # the end-of-document token after every document
    dtype: Literal["uint16", "uint32"]
    splits: dict[str, SplitCounts]
    mixture: MixtureRecord | None = None
    tokenizer_id: str | None = None  # vocab_identity over ids below vocab_size
    tokenizer_path: str | None = None  # the user's directory encoded with; None: a tokenizer stage

    def write(self, export_dir: Path) -> None:
        """Write export_dir/meta.json (atomically); optional fields left out when unset."""
        unset = {name for name in OPTIONAL if getattr(self, name) is None}
        data = self.model_dump(mode="json", exclude=unset)
        atomic_write_json(Path(export_dir) / META_FILE, data)

    @classmethod
    def read(cls, export_dir: Path) -> TokensMeta:
        """The meta.json of a tokenize export."""
        return read_record(cls, Path(export_dir) / META_FILE, "tokenize")

    def require_tokenizer(
        self,
        tokenizer: Path | PreTrainedTokenizerBase,
        model: str,
        tokens: str,
        stage: str,
        fix: str | None = None,
    ) -> None:
        """Raise (for `stage`) unless `tokenizer` (a directory's, or one loaded) maps the ids as
        the tokenizer these tokens (of stage `tokens`) were encoded with; unchecked when none
        was recorded."""
        if self.tokenizer_id is None:
            return
        loaded = load_tokenizer(tokenizer) if isinstance(tokenizer, Path) else tokenizer
        if vocab_identity(loaded, self.vocab_size) == self.tokenizer_id:
            return
        theirs = self.tokenizer_path or "a tokenizer stage's model"
        fix = (
            fix or f"tokenize with its tokenizer (a tokenize stage's tokenizer: {{path: {model}}})"
        )
        raise PipelineError(
            f"stages.{stage}: the tokenizer of {model} is not the one the tokens of {tokens} were "
            f"encoded with ({theirs}); {fix}"
        )


def vocab_identity(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> str:
    """A hash of the tokenizer's id -> token mapping (added tokens included) below vocab_size."""
    limit = tokenizer_vocab_size(tokenizer) if vocab_size is None else vocab_size
    pairs = sorted((i, token) for token, i in tokenizer.get_vocab().items() if i < limit)
    blob = json.dumps([limit, pairs], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Ids a tokenizer can produce: past its length when its ids have gaps."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def tokenizer_identity(tokenizer_dir: Path, vocab_size: int | None = None) -> str:
    """vocab_identity of the Hugging Face tokenizer in a model or tokenizer directory."""
    return vocab_identity(load_tokenizer(tokenizer_dir), vocab_size)


def tokenizers_differ(tokens_dir: Path, model_dir: Path) -> bool:
    """Whether `model_dir`'s tokenizer maps some id of `tokens_dir`'s otherwise. False when
    either cannot be loaded: the plan's location checks report that directory on their own."""
    if tokens_dir == model_dir:
        return False
    try:
        theirs = load_tokenizer(tokens_dir)
        return tokenizer_identity(model_dir, tokenizer_vocab_size(theirs)) != vocab_identity(theirs)
    except PipelineError:
        return False


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """A directory's tokenizer as transformers loads it (AutoTokenizer), or a one-line error."""
    # transformers takes seconds to import; most users of this module only read meta.json.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"{tokenizer_dir}: transformers cannot load its tokenizer ({first}); give a model or "
            f"tokenizer directory with tokenizer.json or tokenizer_config.json"
        ) from None
