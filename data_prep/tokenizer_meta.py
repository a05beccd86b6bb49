"""The tokenizer stage's hand-off record (tokenizer_meta.json): what encodes, and its special ids.

A tokenizer export is either a SentencePiece model the stage trained (with its Hugging Face
twin) or the tokenizer of a user's directory adopted as it is (`tokenizer: {path: DIR}`: GPT-2's,
Llama 3's...). Tokenize reads `backend` to know which to encode with (an adopted Llama tokenizer
brings a tokenizer.model too, which is not how transformers encodes with it); pretrain reads the
special ids to give a model built from scratch the tokenizer's BOS, end-of-document and padding
tokens, and exports an adopted tokenizer's files unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.engine.manifest import atomic_write_json, read_record

META_FILE = "tokenizer_meta.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# The ids every SentencePiece model of the tokenizer stage has (data_prep.tokenizer).
STAGE_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class TokenizerMeta(BaseModel):
    """A tokenizer export: its backend, vocabulary size and special ids."""

    model_config = ConfigDict(extra="ignore")

    backend: Literal["sentencepiece", "huggingface"]
    vocab_size: int
    eos_id: int  # separates documents in the token shards (and ends generation)
    bos_id: int | None = None
    pad_id: int | None = None  # None: pad with eos_id
    unk_id: int | None = None
    adopted_from: str | None = None  # the user's directory whose tokenizer this is

    @property
    def adopted(self) -> bool:
        return self.backend == "huggingface"

    def write(self, export_dir: Path) -> None:
        atomic_write_json(Path(export_dir) / META_FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, export_dir: Path) -> TokenizerMeta:
        """The record of a tokenizer export. An export made before the record existed holds a
        SentencePiece model with the stage's fixed ids."""
        path = Path(export_dir) / META_FILE
        if not path.exists() and (Path(export_dir) / SENTENCEPIECE_MODEL).is_file():
            import sentencepiece as spm

            model = spm.SentencePieceProcessor(
                model_file=str(Path(export_dir) / SENTENCEPIECE_MODEL)
            )
            return cls(backend="sentencepiece", vocab_size=model.get_piece_size(), **STAGE_IDS)
        return read_record(cls, path, "tokenizer")
