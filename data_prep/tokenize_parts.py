"""The tokenize stage with `parts` > 1: encode the parts (processes, or Slurm array tasks), merge.

Each part is encoded alone by data_prep.fanout with the stage's tokenization (the SentencePiece
model or a user directory's fast tokenizer, shipped to the part's process), and the merge writes
the same shards and meta.json as one process does. A part already written for the same
arguments is not encoded again, so a rerun after a failure redoes only the missing parts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from data_prep import fanout
from data_prep.encode import Tokenization
from pipeline.engine import faults
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError

PARTS_DIR = "parts"


def tokenize_in_parts(ctx: StageContext, tokenization: Tokenization) -> dict[str, Any]:
    """Encode the parts not yet done (one process each, at once), then merge them into export/."""
    cfg: Any = ctx.config  # data_prep.tokenize.Config (which imports this module)
    start = time.perf_counter()
    key = parts_key(ctx, tokenization)
    dtype = tokenization.dtype
    part_dirs = [part_dir(ctx, index) for index in range(cfg.parts)]
    todo = [i for i, d in enumerate(part_dirs) if not fanout.part_done(d, {**key, "part": i})]
    if todo:
        ctx.log.info("encoding parts %s of %d in %d processes", todo, cfg.parts, len(todo))
        source = cfg.source[0]
        plan = fanout.plan_parts(source, cfg.parts)
        workers = cfg.num_workers or max(1, len(os.sched_getaffinity(0)) // len(todo))
        jobs = [
            (source, plan[i], tokenization, workers, part_dirs[i], {**key, "part": i}) for i in todo
        ]
        fanout.run_processes(fanout.encode_part, jobs)
        faults.point(ctx.name, "data_write")  # every part committed, none merged yet
    merging = time.perf_counter()
    splits = fanout.merge_parts(
        part_dirs, key, ctx.export_dir, dtype, cfg.shard_tokens, ctx.seed, cfg.val_fraction,
        cfg.source[0].repeat,
    )  # fmt: skip
    tokenization.meta(splits).write(ctx.export_dir)
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


def encode_one_part(ctx: StageContext, index: int, tokenization: Tokenization) -> None:
    """Encode part `index` of a fanned-out tokenize stage (one task of its Slurm job array)."""
    cfg: Any = ctx.config  # data_prep.tokenize.Config
    parts = cfg.parts
    if not 0 <= index < parts:
        raise PipelineError(f"stage {ctx.name}: part {index} out of range 0..{parts - 1}")
    part_key = {**parts_key(ctx, tokenization), "part": index}
    where = part_dir(ctx, index)
    if fanout.part_done(where, part_key):
        return
    source = cfg.source[0]
    plan = fanout.plan_parts(source, parts)
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    fanout.encode_part(source, plan[index], tokenization, workers, where, part_key)


def parts_key(ctx: StageContext, tokenization: Tokenization) -> dict[str, Any]:
    """What the parts of this run must have been written for."""
    return {
        "fingerprint": ctx.fingerprint,
        "model_sha256": tokenization.signature,
        "parts": ctx.config.parts,  # type: ignore[attr-defined]
        "vocab_size": tokenization.vocab_size,
    }


def part_dir(ctx: StageContext, index: int) -> Path:
    """Where part `index` is written until the merge."""
    return ctx.stage_dir / PARTS_DIR / f"part_{index:05d}"
