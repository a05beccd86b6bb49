"""Stage kind `tokenizer`: train a lossless SentencePiece model and export it for Hugging Face,
or adopt the tokenizer of a user's directory (`tokenizer: {path: DIR}`).

A trained export holds `tokenizer.model` (SentencePiece) and a `tokenizers`-backed transformers
tokenizer that encodes identically: identity normalisation, no dummy prefix, whitespace kept,
byte fallback, so any text round-trips and both libraries agree id for id. An adopted export
holds the directory's tokenizer files byte for byte, so a model pretrained from scratch on it
speaks the vocabulary of GPT-2, Llama 3 or whichever model the user took it from. Either way
tokenizer_meta.json says which it is and what its special ids are (data_prep.tokenizer_meta).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from data_prep.documents_meta import check_source_or_documents, with_documents
from data_prep.sources import SourceConfig, SourceStageConfig, mixed_documents
from data_prep.tokenizer_meta import STAGE_IDS, TokenizerMeta
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, StageSpec
from pipeline.engine.locations import Location
from pipeline.models import SENTENCEPIECE_SPECIALS, unmatch_special_tokens
from pipeline.train.tokenizer_files import carry_sentencepiece

MODEL_FILE = "tokenizer.model"
UNK, BOS, EOS, PAD = SENTENCEPIECE_SPECIALS
UNK_ID, BOS_ID = STAGE_IDS["unk_id"], STAGE_IDS["bos_id"]
EOS_ID, PAD_ID = STAGE_IDS["eos_id"], STAGE_IDS["pad_id"]
# Training text is fed as chunks of whole lines under SentencePiece's max_sentence_length.
CHUNK_BYTES = 4000
MAX_SENTENCE_BYTES = 8192
# Unigram scores are rounded to multiples of 1/16 so that SentencePiece (float32) and
# tokenizers (float64) sum path scores exactly and break Viterbi ties the same way (unrounded,
# about 3 tokens in 100,000 differ). Float32 holds such sums exactly down to -2**20: documents
# over about 300 kB need SentencePiece >= 0.2.2, which rebases its sums as a path grows.
SCORE_STEPS_PER_UNIT = 16
NORMAL_PIECE = 1
# SentencePiece's split_digits isolates these (its is_unicode_decimal_number), not ² or ½.
SPLIT_DIGITS_PATTERN = "[0-9\uff10-\uff19]"


# Settings of training, which an adopted tokenizer does not use.
TRAINING_FIELDS = (
    "model_type",
    "vocab_size",
    "sample_bytes",
    "character_coverage",
    "max_piece_length",
    "split_digits",
)


class Config(SourceStageConfig):
    """Train a SentencePiece tokenizer (BPE or unigram, byte fallback) on a text sample, or adopt
    a model's tokenizer."""

    kind: Literal["tokenizer"] = "tokenizer"
    source_optional = True
    source: list[SourceConfig] = Field(
        default_factory=list,
        description="a source, or a list of sources mixed document by document (to train on; "
        "with `tokenizer:`, optional: bytes per token are measured on its sample)",
    )
    documents: str | None = Field(
        None,
        description="a curate stage's name: train on its kept documents (mixed round-robin) "
        "instead of a `source`",
    )
    tokenizer: Location | None = Field(
        None,
        description="{path: DIR}: adopt the Hugging Face fast tokenizer of a model or tokenizer "
        "directory (its files exported unchanged) instead of training one",
    )
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    sample_bytes: int = Field(10_000_000, ge=1)
    character_coverage: float = Field(0.9995, gt=0, le=1)
    max_piece_length: int = Field(16, ge=1, le=64)
    num_threads: int = Field(0, ge=0)
    split_digits: bool = Field(
        False, description="every digit its own token (as in LLaMA); helps models learn arithmetic"
    )

    @model_validator(mode="after")
    def _trains_or_adopts(self) -> Config:
        check_source_or_documents(self.source, self.documents)
        if self.tokenizer is None and not self.source and self.documents is None:
            raise ValueError(
                "no `source` to train on; name a source or a curate stage (documents: STAGE), "
                "or adopt a model's tokenizer with tokenizer: {path: DIR}"
            )
        if self.tokenizer is not None:
            defaults = type(self).model_fields
            training = [n for n in TRAINING_FIELDS if getattr(self, n) != defaults[n].default]
            if training:
                raise ValueError(
                    f"{', '.join(training)}: settings of training, but tokenizer: "
                    f"{{path: {self.tokenizer.path}}} adopts a tokenizer as it is; remove them "
                    f"(or remove `tokenizer:` to train one)"
                )
        return self


def run(ctx: StageContext) -> None:
    """Train on the first `sample_bytes` of the source (or adopt the directory's tokenizer) and
    export to `ctx.export_dir`."""
    ctx = with_documents(ctx)
    cfg = ctx.config
    assert isinstance(cfg, Config)
    if cfg.tokenizer is not None:
        adopt(ctx, ctx.input("tokenizer").path)
        return
    documents = ctx.progress(
        take_bytes((doc for doc, _ in mixed_documents(cfg.source)), cfg.sample_bytes),
        desc="tokenizer sample",
    )
    stats = train_tokenizer(
        documents,
        ctx.export_dir,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        max_piece_length=cfg.max_piece_length,
        num_threads=cfg.num_threads,
        seed=ctx.seed,
        split_digits=cfg.split_digits,
    )
    ctx.log.info(
        "vocab %d trained on %d bytes: %.2f bytes/token",
        stats["vocab_size"],
        stats["training_bytes"],
        stats["bytes_per_token"],
    )
    ctx.write_summary(stats, headline="bytes_per_token")


def adopt(ctx: StageContext, source_dir: Path) -> None:
    """Export the directory's tokenizer files unchanged, with the record of its special ids;
    bytes per token are measured on the source's sample when the stage has a source."""
    from data_prep.encode import open_tokenization
    from data_prep.tokens_meta import load_tokenizer
    from pipeline.train.tokenizer_files import copy_tokenizer_files

    tokenization = open_tokenization(source_dir)  # one-line errors: slow, no end-of-text token
    tokenizer = load_tokenizer(source_dir)
    out = ctx.export_dir
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(source_dir, out)
    TokenizerMeta(
        backend="huggingface",
        vocab_size=tokenization.vocab_size,
        eos_id=tokenization.eos_id,
        bos_id=tokenizer.bos_token_id,
        pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id,
        adopted_from=str(source_dir),
    ).write(out)
    stats: dict[str, Any] = {"vocab_size": tokenization.vocab_size}
    cfg: Config = ctx.config  # type: ignore[assignment]
    if cfg.source:
        sample = list(take_bytes((doc for doc, _ in mixed_documents(cfg.source)), cfg.sample_bytes))
        num_bytes = sum(len(doc.encode("utf-8")) for doc in sample)
        num_tokens = sum(map(len, tokenization.backend.encode_batch(sample)))
        stats |= {"sample_bytes": num_bytes, "bytes_per_token": num_bytes / max(num_tokens, 1)}
    ctx.log.info("adopted the tokenizer of %s: vocab %d", source_dir, tokenization.vocab_size)
    ctx.write_summary(stats, headline="vocab_size")


def train_tokenizer(
    documents: Iterable[str],
    out_dir: Path,
    model_type: str = "bpe",
    vocab_size: int = 4096,
    character_coverage: float = 0.9995,
    max_piece_length: int = 16,
    num_threads: int = 0,
    seed: int = 0,
    split_digits: bool = False,
) -> dict[str, Any]:
    """Train SentencePiece on `documents`, write the SP and HF exports; returns summary stats."""
    import io
    import os

    import sentencepiece as spm

    chunks = list(training_chunks(documents))
    training_bytes = sum(len(c.encode("utf-8")) for c in chunks)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            max_sentencepiece_length=max_piece_length,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            input_sentence_size=0,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise PipelineError(
            f"tokenizer: SentencePiece training failed on {training_bytes} bytes "
            f"({str(exc).splitlines()[0]}); use a smaller vocab_size or more sample_bytes"
        ) from None
    proto = _quantized(model.getvalue()) if model_type == "unigram" else model.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(proto)
    export_hf_tokenizer(out_dir / MODEL_FILE, out_dir)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    TokenizerMeta(
        backend="sentencepiece", vocab_size=processor.get_piece_size(), **STAGE_IDS
    ).write(out_dir)
    num_tokens = sum(map(len, processor.encode(chunks, num_threads=os.cpu_count() or 1)))
    return {
        "vocab_size": processor.get_piece_size(),
        "training_bytes": training_bytes,
        "bytes_per_token": training_bytes / max(num_tokens, 1),
    }


def take_bytes(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The documents up to `max_bytes` UTF-8 bytes in all; the last one cut at a character."""
    left = max_bytes
    for doc in documents:
        data = doc.encode("utf-8")
        if len(data) >= left:
            yield data[:left].decode("utf-8", errors="ignore")
            return
        left -= len(data)
        yield doc


def training_chunks(documents: Iterable[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Documents cut at line boundaries into pieces of at most `chunk_bytes`, newlines kept."""
    for doc in documents:
        buffer: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            for part in _split_long(line, chunk_bytes):
                part_size = len(part.encode("utf-8"))
                if size + part_size > chunk_bytes and buffer:
                    yield "".join(buffer)
                    buffer, size = [], 0
                buffer.append(part)
                size += part_size
        if buffer:
            yield "".join(buffer)


def _split_long(line: str, chunk_bytes: int) -> Iterator[str]:
    """A line longer than `chunk_bytes` as character-boundary pieces that each fit."""
    data = line.encode("utf-8")
    while len(data) > chunk_bytes:
        cut = chunk_bytes
        while cut > 0 and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:]
    yield data.decode("utf-8")


def _quantized(model_proto: bytes) -> bytes:
    """The unigram model with piece scores rounded so float32 and float64 Viterbi agree."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    for piece in proto.pieces:
        if piece.type == NORMAL_PIECE:
            piece.score = round(piece.score * SCORE_STEPS_PER_UNIT) / SCORE_STEPS_PER_UNIT
    return proto.SerializeToString()


def export_hf_tokenizer(model_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json that encode exactly like `model_path`, with
    the add_bos_token / add_eos_token / add_prefix_space flags other runtimes read (all false)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    pieces = [(p.piece, p.score, p.type == NORMAL_PIECE) for p in proto.pieces]
    is_unigram = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    if not is_unigram:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        # SentencePiece merges by the score of the merged piece; control and byte pieces are
        # never produced from text, so they take no part in merges.
        scores = {piece: score for piece, score, normal in pieces if normal}
        special = [piece for piece, _, normal in pieces if not normal]
        merges = generate_merges(vocab, scores, skip_tokens=special)
        model: Any = models.BPE(
            vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True
        )
    else:
        # Control and byte pieces score far below any path of normal pieces, so text matches
        # them only across a character that has no piece (see _splits).
        floor = min(score for _, score, normal in pieces if normal) - 1e6
        vocab_scores = [(piece, score if normal else floor) for piece, score, normal in pieces]
        model = models.Unigram(vocab_scores, unk_id=UNK_ID, byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    splits = _splits(pieces, split_digits=proto.trainer_spec.split_digits, unigram=is_unigram)
    if splits:
        backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # split_special_tokens: literal "<s>" in text is text, as it is for SentencePiece.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    unmatch_special_tokens(out_dir / "tokenizer.json")
    carry_sentencepiece(model_path.parent, out_dir)  # flags llama.cpp's converter reads


def _splits(pieces: list[tuple[str, float, bool]], split_digits: bool, unigram: bool) -> list[Any]:
    """Pre-tokenizers for the token boundaries SentencePiece has without splitting the text.

    With split_digits no piece joins a digit to anything. A unigram `tokenizers` model matches
    every vocab entry, "<pad>" and "<0x41>" included, and scores a character without a piece
    below any entry, so literal "<pad>" without a "p" piece became the pad token; SentencePiece
    never matches control or byte pieces. A character that no piece contains is a token
    boundary for SentencePiece (<unk>, then bytes), so isolating it changes nothing there.
    """
    from tokenizers import Regex, pre_tokenizers

    splits: list[Any] = []
    if split_digits:
        splits.append(pre_tokenizers.Split(Regex(SPLIT_DIGITS_PATTERN), "isolated"))
    in_pieces = {c for piece, _, normal in pieces if normal for c in piece}
    in_names = {c for piece, _, normal in pieces if not normal for c in piece}
    stray = sorted(in_names - in_pieces) if unigram else []
    if stray:
        pattern = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in stray) + "]"
        splits.append(pre_tokenizers.Split(Regex(pattern), "isolated"))
    return splits


SPEC = StageSpec(
    Config,
    run,
    output="tokenizer",
    inputs=(
        Input(
            "tokenizer", (), field="tokenizer", location="tokenizer", required=False, nearest=False
        ),
        Input("documents", ("documents",), field="documents", required=False, nearest=False),
    ),
)
