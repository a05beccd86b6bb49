"""Throughput and peak memory of the curate stage's near-duplicate removal against datatrove's own
MinHash pipeline, on the same input and one core each.

Input: Python standard-library source files (text nobody here wrote) as JSONL, plus 10% exact
copies and 10% near copies (about 2% of words replaced). Measured, each run in a fresh process
(so its peak RSS is its own), interleaved for `--repeats` rounds:

  stage      our curate stage with steps [near]: analysis pass, decision, compressed shards
  datatrove  datatrove's four MinHash stages with its defaults (LocalPipelineExecutor, 1 task
             for signatures, cluster and filter, one per band for buckets), JsonlReader/Writer
  sig/ours   the MinHash signatures alone as the stage computes them
  sig/dt     datatrove's MinhashDedupSignature alone with its default (spaCy) word tokenizer

Prints MB/s per core of each, the ratio ours / datatrove per round (median and range) and each
variant's peak RSS.

    .venv/bin/python bench/curate_throughput.py --megabytes 20 --repeats 3

datatrove's JSONL reader needs orjson (`pip install orjson`); the stage itself does not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_input(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write the JSONL input; its size in bytes of text."""
    from data_prep.sources import stdlib_documents

    rng = random.Random(seed)
    docs: list[str] = []
    size = 0
    for doc in stdlib_documents():
        docs.append(doc)
        size += len(doc.encode())
        if size >= megabytes * 1e6 / 1.2:
            break
    originals = len(docs)
    for original in rng.sample(range(originals), originals // 10):
        docs.append(docs[original])
    for original in rng.sample(range(originals), originals // 10):
        words = docs[original].split(" ")
        for _ in range(max(1, len(words) // 50)):
            words[rng.randrange(len(words))] = "edited"
        docs.append(" ".join(words))
    rng.shuffle(docs)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return sum(len(d.encode()) for d in docs)


def ours_stage(data: Path, work: Path) -> None:
    from data_prep.curate import Config
    from data_prep.curate_decide import decide
    from data_prep.curate_passes import PartJob, analyze_part
    from data_prep.curate_write import write_documents

    cfg = Config(kind="curate", source=str(data), steps=["near"])
    analyze_part(PartJob(cfg, 0, 0, work / "phase0", {"bench": 1}))
    decisions = decide(cfg, [work / "phase0"], 1, [])
    write_documents(cfg, cfg.source_names(), decisions, work / "export")


def datatrove_pipeline(data: Path, work: Path) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()
    logs = str(work / "logs")

    def execute(pipeline: list[Any], tasks: int, name: str) -> None:
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{logs}/{name}"
        ).run()

    reader = JsonlReader(str(data.parent), glob_pattern=data.name)
    execute([reader, MinhashDedupSignature(str(work / "sigs"), config)], 1, "sigs")
    execute([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
            config.num_buckets, "buckets")  # fmt: skip
    execute([MinhashDedupCluster(str(work / "buckets"), str(work / "ids"), config=config)], 1, "c")
    reader = JsonlReader(str(data.parent), glob_pattern=data.name)
    removed = JsonlWriter(str(work / "removed"))
    execute(
        [reader, MinhashDedupFilter(str(work / "ids"), exclusion_writer=removed),
         JsonlWriter(str(work / "kept"))],
        1,
        "filter",
    )  # fmt: skip


def signatures(data: Path, work: Path, ours: bool) -> None:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from data_prep.curate_minhash import minhash_config, sign
    from data_prep.curate_options import NearOptions

    def documents() -> Any:
        with data.open(encoding="utf-8") as f:
            for index, line in enumerate(f):
                yield Document(text=json.loads(line)["text"], id=str(index))

    if ours:
        sign(documents(), NearOptions(), work, 0)
    else:
        block = MinhashDedupSignature(str(work), minhash_config(NearOptions()))
        block.run(documents(), rank=0, world_size=1)


VARIANTS = {
    "stage": ours_stage,
    "datatrove": datatrove_pipeline,
    "sig/ours": lambda data, work: signatures(data, work, True),
    "sig/dt": lambda data, work: signatures(data, work, False),
}


def _child(name: str, data: str, results: Any) -> None:
    from loguru import logger

    logger.remove()  # datatrove's executor logs every block's stats
    work = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    try:
        start = time.perf_counter()
        VARIANTS[name](Path(data), work)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(name: str, data: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one variant in a fresh process."""
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    process = context.Process(target=_child, args=(name, str(data), results))
    process.start()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{name} failed (exit {process.exitcode})")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="curate_input_"))
    data = folder / "input.jsonl"
    size = make_input(data, args.megabytes)
    print(f"input: {size / 1e6:.1f} MB of text, {sum(1 for _ in data.open())} documents, 1 core")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for round_index in range(args.repeats):
        for name in VARIANTS:  # interleaved: a slow spell of the machine hits every variant
            runs[name].append(measure(name, data))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{n} {size / 1e6 / runs[n][-1][0]:.2f} MB/s" for n in VARIANTS))  # fmt: skip
    for name, found in runs.items():
        rates = [size / 1e6 / seconds for seconds, _ in found]
        peak = max(rss for _, rss in found)
        print(f"{name:10s} {statistics.median(rates):7.2f} MB/s per core "
              f"[{min(rates):.2f}, {max(rates):.2f}]  peak RSS {peak:.0f} MB")  # fmt: skip
    for ours, theirs in (("stage", "datatrove"), ("sig/ours", "sig/dt")):
        ratios = [b[0] / a[0] for a, b in zip(runs[ours], runs[theirs], strict=True)]
        print(f"{ours} / {theirs}: {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} interleaved rounds")  # fmt: skip
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
