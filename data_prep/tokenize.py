"""Stage kind `tokenize`: encode a source with the upstream tokenizer into train/val token shards.

Documents are encoded by parallel worker threads (data_prep.encode), in order, with an
end-of-document token after each; a hash of the document index and the seed decides which split
a document belongs to. A mixture of sources is round-robin, or weighted by train tokens
(data_prep.mixture), and meta.json records which runs of val tokens came from which source. Shards are committed one at a time, and after each the
stage records where in the document stream it stands, so a killed stage resumes after its last
committed shard (skipping, not re-encoding, the documents before it) and ends byte-identical.
With `parts` > 1 the source is split into parts encoded by separate processes (or the tasks of a
Slurm job array) and merged into the same bytes (data_prep.fanout).
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

from data_prep import fanout
from data_prep.encode import Encoder
from data_prep.fanout import is_val_document as is_val_document
from data_prep.mixture import Item, Mixture, Stream, mixture_of
from data_prep.shards import ShardWriter, token_dtype
from data_prep.sources import SourceStageConfig
from data_prep.tokenizer import EOS_ID, MODEL_FILE
from pipeline.engine import faults
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, sha256_file

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
Progress = Callable[..., Iterator[Any]]


class Config(SourceStageConfig):
    """Tokenize a source (or a mixture) into train/val shards with the upstream tokenizer's model."""

    kind: Literal["tokenize"] = "tokenize"
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
        if self.parts > 1:
            problem = (
                "a mixture of sources"
                if len(self.source) > 1
                else fanout.fanout_problem(self.source[0])
            )
            if problem:
                raise ValueError(
                    f"parts={self.parts} cannot give the bytes of one process: {problem}; "
                    f"set parts: 1 (or use one file source, a file or a glob)"
                )
        return self


def run(ctx: StageContext) -> None:
    """Tokenize the source into `ctx.export_dir` (train/, val/, meta.json)."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    model_path = ctx.upstream("tokenizer").export_dir / MODEL_FILE
    if not model_path.is_file():
        raise PipelineError(f"{model_path}: missing; rerun the tokenizer stage")
    if cfg.parts > 1:
        stats = tokenize_in_parts(ctx, model_path)
    else:
        stats = tokenize_corpus(
            mixture_of(cfg.source, cfg.source_names()),
            model_path,
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


def tokenize_corpus(
    documents: Iterable[Item] | Mixture,
    model_path: Path,
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
    import sentencepiece as spm

    start = time.perf_counter()
    mixture = documents if isinstance(documents, Mixture) else Stream(documents)
    vocab_size = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    dtype = token_dtype(vocab_size)
    work_dir = out_dir if resume_dir is None else resume_dir
    key = {
        "fingerprint": fingerprint,
        "model_sha256": sha256_file(model_path),
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    splitter = _Splitter(work_dir, dtype, shard_tokens, seed, val_fraction, key, resume_dir, stage)
    resumed = splitter.restore(mixture)
    with Encoder(model_path, dtype, EOS_ID, num_workers) as encoder:
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
    meta = {"vocab_size": vocab_size, "eos_id": EOS_ID, "dtype": dtype.name, "splits": splits}
    stats: dict[str, Any] = {}
    if len(mixture.names) > 1:
        meta["mixture"] = mixture.record()
        stats = mixture.summary()
    if resume_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            os.replace(resume_dir / name, out_dir / name)
        shutil.rmtree(resume_dir)  # the progress record, and temp files a kill left behind
    atomic_write_json(out_dir / META_FILE, meta)
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


PARTS_DIR = "parts"


def tokenize_in_parts(ctx: StageContext, model_path: Path) -> dict[str, Any]:
    """Encode the parts not yet done (one process each, at once), then merge them into export/."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    start = time.perf_counter()
    key, dtype = _parts_key(ctx, model_path)
    part_dirs = [_part_dir(ctx, index) for index in range(cfg.parts)]
    todo = [i for i, d in enumerate(part_dirs) if not fanout.part_done(d, {**key, "part": i})]
    if todo:
        ctx.log.info("encoding parts %s of %d in %d processes", todo, cfg.parts, len(todo))
        plan = fanout.plan_parts(cfg.source[0], cfg.parts)
        workers = cfg.num_workers or max(1, len(os.sched_getaffinity(0)) // len(todo))
        source, where = cfg.source[0], (model_path, dtype.str, EOS_ID, workers)
        jobs = [(source, plan[i], *where, part_dirs[i], {**key, "part": i}) for i in todo]
        fanout.run_processes(fanout.encode_part, jobs)
        faults.point(ctx.name, "data_write")  # every part committed, none merged yet
    merging = time.perf_counter()
    splits = fanout.merge_parts(
        part_dirs, key, ctx.export_dir, dtype, cfg.shard_tokens, ctx.seed, cfg.val_fraction,
        cfg.source[0].repeat,
    )  # fmt: skip
    meta = {
        "vocab_size": key["vocab_size"],
        "eos_id": EOS_ID,
        "dtype": dtype.name,
        "splits": splits,
    }
    atomic_write_json(ctx.export_dir / META_FILE, meta)
    done = time.perf_counter()
    rates = [json.loads((d / fanout.PART_FILE).read_text())["tokens_per_second"] for d in part_dirs]
    shutil.rmtree(ctx.stage_dir / PARTS_DIR)
    tokens = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    return {
        "train_tokens": splits["train"]["num_tokens"],
        "val_tokens": splits["val"]["num_tokens"],
        "documents": splits["train"]["num_documents"] + splits["val"]["num_documents"],
        "resumed_documents": 0,
        "tokens_per_second": tokens / max(done - start, 1e-9),
        "parts": cfg.parts,
        "part_tokens_per_second": sum(rates) / len(rates),
        "merge_seconds": done - merging,
    }


def run_part(ctx: StageContext, index: int) -> None:
    """Encode part `index` of a fanned-out tokenize stage (one task of its Slurm job array)."""
    cfg = ctx.config
    assert isinstance(cfg, Config)
    if not 0 <= index < cfg.parts:
        raise PipelineError(f"stage {ctx.name}: part {index} out of range 0..{cfg.parts - 1}")
    model_path = ctx.upstream("tokenizer").export_dir / MODEL_FILE
    key, dtype = _parts_key(ctx, model_path)
    part_key = {**key, "part": index}
    part_dir = _part_dir(ctx, index)
    if fanout.part_done(part_dir, part_key):
        return
    plan = fanout.plan_parts(cfg.source[0], cfg.parts)
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    fanout.encode_part(
        cfg.source[0], plan[index], model_path, dtype.str, EOS_ID, workers, part_dir, part_key
    )


def _parts_key(ctx: StageContext, model_path: Path) -> tuple[dict[str, Any], np.dtype]:
    """What the parts of this run must have been written for, and the token dtype."""
    import sentencepiece as spm

    cfg = ctx.config
    assert isinstance(cfg, Config)
    vocab_size = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    key = {
        "fingerprint": ctx.fingerprint,
        "model_sha256": sha256_file(model_path),
        "parts": cfg.parts,
        "vocab_size": vocab_size,
    }
    return key, token_dtype(vocab_size)


def _part_dir(ctx: StageContext, index: int) -> Path:
    return ctx.stage_dir / PARTS_DIR / f"part_{index:05d}"


def read_meta(export_dir: Path) -> dict[str, Any]:
    """The tokenize stage's meta.json (vocab_size, eos_id, dtype, per-split counts)."""
    return json.loads((Path(export_dir) / META_FILE).read_text(encoding="utf-8"))
