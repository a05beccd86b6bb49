"""The tokenizer files that runtimes other than transformers read beside tokenizer.json.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.set_vocab) builds a GGUF vocabulary
from `tokenizer.model`: pieces, SentencePiece scores and piece types; without that file it falls
back to tokenizer.json and gives every token a placeholder score. How to encode, it reads from
tokenizer_config.json alone: `add_prefix_space` (absent, llama.cpp prepends a space, its
SentencePiece default) and `add_bos_token` / `add_eos_token` (gguf's SpecialVocab; absent,
llama.cpp adds a BOS). transformers' save_pretrained writes neither tokenizer.model nor
add_bos_token / add_eos_token, so each export of a tokenizer-stage tokenizer gets them here,
saying what the tokenizer does: no dummy prefix (its SentencePiece model), and BOS / EOS as its
tokenizer.json's post-processor adds them (none, unless a stage changed that).

llama.cpp encodes a SentencePiece model of the llama family with BPE's rule (merge the
best-scoring pair), so it tokenizes as we do with a BPE tokenizer (`model_type: bpe`, the
default); a unigram one converts, but llama.cpp splits much text otherwise
(bench/llamacpp_agreement.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

from pipeline.engine.locations import TOKENIZER_ALL_FILES

SENTENCEPIECE_FILE = "tokenizer.model"
PROBE_TEXT = "a"  # any text that encodes to at least one token


def copy_tokenizer_files(source: Path, export_dir: Path) -> None:
    """Make `export_dir`'s tokenizer files those of `source`, byte for byte: a user's tokenizer
    (Llama's `<s>`, a chat template) is kept as it was, not as save_pretrained rewrites it."""
    for name in TOKENIZER_ALL_FILES:
        written = export_dir / name
        if written.exists():
            written.unlink()
        if (source / name).is_file():
            shutil.copy2(source / name, written)


def carry_sentencepiece(tokenizer_dir: Path, export_dir: Path) -> None:
    """Copy the tokenizer stage's SentencePiece model from `tokenizer_dir` into `export_dir` (which
    holds the saved tokenizer.json and tokenizer_config.json) and write there how the tokenizer
    encodes; nothing when `tokenizer_dir` has no SentencePiece model our tokenizer stage made,
    or when the export's tokenizer is not that model's."""
    # Imported here: the CLI imports this module's users to validate recipes, without encoding.
    from tokenizers import Tokenizer

    source = tokenizer_dir / SENTENCEPIECE_FILE
    proto = _stage_model(source)
    if proto is None:
        return
    tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    if not _same_pieces(proto, tokenizer):
        return
    target = export_dir / SENTENCEPIECE_FILE
    if not (target.exists() and target.samefile(source)):
        shutil.copyfile(source, target)
    flags = {
        **_added_special_tokens(tokenizer),
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
    }
    path = export_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, **flags}, ensure_ascii=False, indent=2) + "\n")


def _stage_model(path: Path) -> Any:
    """The SentencePiece ModelProto at `path` if our tokenizer stage trained it (identity
    normalisation, no dummy prefix, whitespace kept, byte fallback), else None."""
    from sentencepiece import sentencepiece_model_pb2

    if not path.is_file():
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    normalizer = proto.normalizer_spec
    lossless = (
        normalizer.name == "identity"
        and not normalizer.add_dummy_prefix
        and not normalizer.remove_extra_whitespaces
        and proto.trainer_spec.byte_fallback
    )
    return proto if lossless else None


def _same_pieces(proto: Any, tokenizer: Tokenizer) -> bool:
    """Whether the export's tokenizer gives every SentencePiece piece its id (llama.cpp takes the
    vocabulary from tokenizer.model, the model's embeddings follow tokenizer.json)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return all(vocab.get(piece.piece) == i for i, piece in enumerate(proto.pieces))


def _added_special_tokens(tokenizer: Tokenizer) -> dict[str, bool]:
    """add_bos_token / add_eos_token as tokenizer.json's post-processor adds tokens around text."""
    plain = tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    full = tokenizer.encode(PROBE_TEXT, add_special_tokens=True).ids
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return {"add_bos_token": start > 0, "add_eos_token": start + len(plain) < len(full)}
