"""Stage kind `tokenize`: encode a source with a tokenizer into train/val token shards.

The tokenizer is the upstream tokenizer stage's SentencePiece model, or with `tokenizer: {path:
DIR}` the Hugging Face fast tokenizer of a user's model or tokenizer directory, so that a model
directory can be trained further on tokens of its own vocabulary (data_prep.encode says which
token separates documents). Documents are encoded by parallel worker threads (data_prep.encode),
in order, with an end-of-document token after each; a hash of the document index and the seed
decides which split a document belongs to. A mixture of sources is round-robin, or weighted by
train tokens (data_prep.mixture). meta.json (data_prep.tokens_meta) records which runs of val
tokens came from which source and which tokenizer made the ids. Shards are committed one at a
time, and after each the stage records where in the document stream it stands, so a killed
stage resumes after its last committed shard (skipping, not re-encoding, the documents before
it) and ends byte-identical. With `parts` > 1 the source is split into parts encoded by separate
processes (or the tasks of a Slurm job array) and merged into the same bytes
(data_prep.tokenize_parts, data_prep.fanout).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from data_prep import fanout, tokenize_parts
from data_prep.documents_meta import check_source_or_documents, with_documents
from data_prep.encode import Encoder, Tokenization, open_tokenization
from data_prep.fanout import is_val_document as is_val_document
from data_prep.mixture import Item, Mixture, Stream, mixture_of
from data_prep.shards import ShardWriter
from data_prep.sources import SourceConfig, SourceStageConfig
from data_prep.tokenizer import MODEL_FILE
from data_prep.tokenizer_meta import TokenizerMeta
from data_prep.tokens_meta import META_FILE as META_FILE
from pipeline.engine import faults
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, StageSpec
from pipeline.engine.locations import Location
from pipeline.engine.manifest import atomic_write_json

PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
Progress = Callable[..., Iterator[Any]]


class Config(SourceStageConfig):
    """Tokenize a source (or a mixture) into train/val shards with a tokenizer."""

    kind: Literal["tokenize"] = "tokenize"
    source_optional = True
    source: list[SourceConfig] = Field(
        default_factory=list,
        description="a source, or a list of sources mixed document by document (or `documents`)",
    )
    documents: str | None = Field(
        None,
        description="a curate stage's name: tokenize its kept documents, mixed with its "
        "sources' names and weights, instead of a `source`",
    )
    tokenizer: str | Location | None = Field(
        None,
        description="a tokenizer stage's name, or {path: DIR}: the Hugging Face fast tokenizer of "
        "a model or tokenizer directory (documents end with its <|endoftext|>, else its "
        "eos_token); default: the nearest upstream tokenizer stage",
    )
    val_fraction: float = Field(0.02, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    shard_tokens: int = Field(100_000_000, ge=1)
    parts: int = Field(
        1,
        ge=1,
        description="split the source (by file, or a big plain .txt by byte ranges cut at document "
        "boundaries) into this many parts encoded in parallel, then merged into the same bytes "
        "as one process writes; locally N processes, under `pipeline submit` a Slurm job array "
        "plus a merge job; needs a single file source without max_documents/max_bytes",
    )

    @model_validator(mode="after")
    def _parts_need_one_file_source(self) -> Config:
        check_source_or_documents(self.source, self.documents)
        if not self.source and self.documents is None:
            raise ValueError("no `source`; name a source, or a curate stage (documents: STAGE)")
        if problem := fanout.parts_problem(self.parts, self.source):
            raise ValueError(problem)
        return self


def run(ctx: StageContext) -> None:
    """Tokenize the source into `ctx.export_dir` (train/, val/, meta.json)."""
    ctx = with_documents(ctx)
    cfg = ctx.config
    assert isinstance(cfg, Config)
    tokenization = open_tokenization(tokenizer_path(ctx))
    if tokenization.tokenizer_path is not None:
        ctx.log.info("encoding with the tokenizer of %s", tokenization.tokenizer_path)
    if cfg.parts > 1:
        stats = tokenize_parts.tokenize_in_parts(ctx, tokenization)
    else:
        stats = tokenize_corpus(
            mixture_of(cfg.source, cfg.source_names()),
            tokenization,
            ctx.export_dir,
            seed=ctx.seed,
            val_fraction=cfg.val_fraction,
            num_workers=cfg.num_workers,
            shard_tokens=cfg.shard_tokens,
            progress=ctx.progress,
            resume_dir=ctx.checkpoint_dir / "tokens",
            fingerprint=ctx.fingerprint,
            stage=ctx.name,
        )
    if cfg.val_fraction > 0 and stats["val_tokens"] == 0:
        ctx.log.warning(
            "val is empty: %d document(s) cannot be split into train and val; give the source "
            "more documents (a .txt source: separator blank_line or line)",
            stats["documents"],
        )
    if stats["resumed_documents"]:
        ctx.log.info("resumed after %d documents in committed shards", stats["resumed_documents"])
    ctx.log.info(
        "%d documents -> %d train + %d val tokens (%.0f tokens/s)",
        stats["documents"],
        stats["train_tokens"],
        stats["val_tokens"],
        stats["tokens_per_second"],
    )
    for key in sorted(k for k in stats if k.startswith(("share/", "epochs/"))):
        ctx.log.info("%s: %.4f", key, stats[key])
    if "mixture_window_tokens" in stats:
        ctx.log.info(
            "every source's share is within 1 point of its weight over any %d train tokens",
            stats["mixture_window_tokens"],
        )
    ctx.write_summary(stats, headline="train_tokens")


def tokenizer_path(ctx: StageContext) -> Path:
    """What to encode with: the tokenizer stage's SentencePiece model, or a Hugging Face
    tokenizer's directory (the user's, or one the tokenizer stage adopted)."""
    found = ctx.input("tokenizer")
    if found.external or TokenizerMeta.read(found.path).adopted:
        return found.path
    model_path = found.path / MODEL_FILE
    if not model_path.is_file():
        raise PipelineError(f"{model_path}: missing; rerun the tokenizer stage")
    return model_path


def tokenize_corpus(
    documents: Iterable[Item] | Mixture,
    tokenizer: Path | Tokenization,
    out_dir: Path,
    seed: int = 0,
    val_fraction: float = 0.02,
    num_workers: int = 0,
    shard_tokens: int = 100_000_000,
    progress: Progress | None = None,
    resume_dir: Path | None = None,
    fingerprint: str = "",
    stage: str = "",
) -> dict[str, Any]:
    """Encode documents (eos after each) into out_dir/{train,val}/ shards plus meta.json.

    `tokenizer` is a SentencePiece model file, a Hugging Face tokenizer directory, or either
    opened by data_prep.encode.open_tokenization.

    A document given as (text, repeat) goes `repeat` times into train (upsampling) and once into
    val; which split it belongs to depends on its index only, so copies never straddle splits.
    With val_fraction > 0 and at least two documents, val gets at least one document: when the
    hash picked none, the last document moves to val. With `resume_dir`, shards are written there
    and moved to out_dir at the end; a run killed midway and started again with the same
    arguments (and `fingerprint`, which names the documents) continues after the last shard it
    committed and ends with the same bytes. A Mixture of two or more sources is recorded in
    meta.json under "mixture" (data_prep.mixture). `stage` names the stage for fault injection
    (pipeline.engine.faults: `data_write`).
    """
    start = time.perf_counter()
    mixture = documents if isinstance(documents, Mixture) else Stream(documents)
    tok = tokenizer if isinstance(tokenizer, Tokenization) else open_tokenization(tokenizer)
    dtype = tok.dtype
    work_dir = out_dir if resume_dir is None else resume_dir
    key = {
        "fingerprint": fingerprint,
        "model_sha256": tok.signature,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    splitter = _Splitter(work_dir, dtype, shard_tokens, seed, val_fraction, key, resume_dir, stage)
    resumed = splitter.restore(mixture)
    with Encoder(tok.backend, dtype, tok.eos_id, num_workers) as encoder:
        items = mixture.items(encoder.encode, resumed)
        if progress is not None:
            items = progress(items, desc="tokenize")
        with splitter.train, splitter.val:
            for tokens, repeat, source in items:
                splitter.add(tokens, repeat, source)
            splitter.finish()
    if splitter.num_documents == 0:
        raise PipelineError("tokenize: the source has no documents (empty corpus); add text")
    train, val = splitter.train, splitter.val
    splits = {
        name: {"num_tokens": writer.num_tokens, "num_documents": writer.num_documents}
        for name, writer in zip(SPLITS, (train, val), strict=True)
    }
    mixed = len(mixture.names) > 1
    meta = tok.meta(splits, mixture.record() if mixed else None)
    stats: dict[str, Any] = mixture.summary() if mixed else {}
    if resume_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            os.replace(resume_dir / name, out_dir / name)
        shutil.rmtree(resume_dir)  # the progress record, and temp files a kill left behind
    meta.write(out_dir)
    elapsed = time.perf_counter() - start
    new_tokens = train.num_tokens + val.num_tokens - splitter.resumed_tokens
    return {
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens,
        "documents": splitter.num_documents,
        "resumed_documents": resumed,
        "tokens_per_second": new_tokens / max(elapsed, 1e-9),
        **stats,
    }


class _Splitter:
    """Sends each encoded document to the train or val writer, and (with a resume_dir) records
    after each committed shard where in the document stream a restarted run may continue."""

    def __init__(
        self,
        work_dir: Path,
        dtype: np.dtype,
        shard_tokens: int,
        seed: int,
        val_fraction: float,
        key: dict[str, Any],
        resume_dir: Path | None,
        stage: str = "",
    ) -> None:
        resumable = resume_dir is not None
        self.train = ShardWriter(work_dir / "train", dtype, shard_tokens, resumable)
        self.val = ShardWriter(work_dir / "val", dtype, shard_tokens, resumable)
        self.seed, self.val_fraction, self.stage = seed, val_fraction, stage
        self.key = {**key, "dtype": dtype.name}
        self.progress_path = None if resume_dir is None else resume_dir / PROGRESS_FILE
        self.num_documents = 0
        self.held: tuple[np.ndarray, int, int] | None = None  # the latest train document
        self.saved = (0, 0)  # shards committed when progress was last recorded
        self.resumed_tokens = 0
        self.mixture: Mixture = Stream([])

    def restore(self, mixture: Mixture) -> int:
        """Take the recorded progress (and the mixture's state) if any; the documents to skip."""
        self.mixture = mixture
        if self.progress_path is not None:
            self._restore()
        self.resumed_tokens = self.train.num_tokens + self.val.num_tokens
        return self.num_documents

    def add(self, tokens: np.ndarray, repeat: int, source: int) -> None:
        """Write document `num_documents` to its split (a train document one document late)."""
        if is_val_document(self.num_documents, self.seed, self.val_fraction):
            self.val.add(tokens)
            self.mixture.count(source, "val", len(tokens))
        else:
            if self.held is not None:
                _add(self.train, *self.held[:2])
            if (self.train.num_shards, self.val.num_shards) != self.saved:
                faults.point(self.stage, "data_write")  # committed, not yet in the progress record
                self._save()  # every document before this one is written; none is held
            self.held = (tokens, repeat, source)
            self.mixture.count(source, "train", len(tokens) * repeat)
        self.num_documents += 1

    def finish(self) -> None:
        """Write the held document: to val when val would be empty, else to train."""
        if self.held is not None:
            tokens, repeat, source = self.held
            if self.val_fraction > 0 and self.val.num_documents == 0 and self.num_documents >= 2:
                self.val.add(tokens)
                self.mixture.count(source, "train", -len(tokens) * repeat, documents=-1)
                self.mixture.count(source, "val", len(tokens))
            else:
                _add(self.train, tokens, repeat)

    def _save(self) -> None:
        self.saved = (self.train.num_shards, self.val.num_shards)
        if self.progress_path is not None:
            state = {"train": self.train.state(), "val": self.val.state()}
            progress = {
                "key": self.key,
                "next_document": self.num_documents,
                "splits": state,
                "mixture": self.mixture.state(),
            }
            atomic_write_json(self.progress_path, progress)

    def _restore(self) -> None:
        """Continue from the recorded progress when it is for these arguments; else start over."""
        assert self.progress_path is not None
        try:
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            progress = {}
        try:
            if progress.get("key") != self.key:
                raise ValueError("no progress recorded for these arguments")
            self.train.resume(progress["splits"]["train"])
            self.val.resume(progress["splits"]["val"])
            self.mixture.restore(progress["mixture"])
            self.num_documents = progress["next_document"]
            self.saved = (self.train.num_shards, self.val.num_shards)
        except (OSError, ValueError, KeyError):
            train, val = self.train, self.val
            for writer in (train, val):
                shutil.rmtree(writer.split_dir)
            self.train = ShardWriter(train.split_dir, train.dtype, train.shard_tokens, True)
            self.val = ShardWriter(val.split_dir, val.dtype, val.shard_tokens, True)


def _add(writer: ShardWriter, tokens: np.ndarray, repeat: int) -> None:
    for _ in range(repeat):
        writer.add(tokens)


def run_part(ctx: StageContext, index: int) -> None:
    """Encode part `index` of a fanned-out tokenize stage (one task of its Slurm job array)."""
    ctx = with_documents(ctx)
    tokenize_parts.encode_one_part(ctx, index, open_tokenization(tokenizer_path(ctx)))


def read_meta(export_dir: Path) -> dict[str, Any]:
    """The meta.json record as plain JSON data (for tools and tests; stages read TokensMeta)."""
    return json.loads((Path(export_dir) / META_FILE).read_text(encoding="utf-8"))


SPEC = StageSpec(
    Config,
    run,
    "tokens",
    inputs=(
        Input("tokenizer", ("tokenizer",), field="tokenizer", location="tokenizer"),
        Input("documents", ("documents",), field="documents", required=False, nearest=False),
    ),
    run_part=run_part,
)
