"""The curate stage's acceptance figures at corpus scale, on a planted corpus with known answers.

The corpus is one JSONL file of `--megabytes` MB: originals are text nobody here wrote (the
UTF-8 source and documentation files of this interpreter's standard library and of the virtual
environment's packages, whole files as documents, exact repeats among them left out), plus
copies of random originals (bench/curate_planting.py): 10% exact copies, 10% near copies whose
word 5-gram Jaccard similarity to their original is 0.85-0.95, 5% edited copies at <= 0.5 that
must be kept, and `--problems` held-out arithmetic problems inside ordinary text. The stage runs
through `pipeline run` with its default steps and settings (exact, near, decontaminate) against
the arithmetic task, and the bench prints, against the planted truth:

  documents in/out, exact-duplicate recall, near-duplicate recall (the later document of each
  planted near pair removed as a duplicate) and precision (the share of near removals whose
  true Jaccard reaches the threshold 0.75, and 0.7 allowing for the estimate's noise, with the
  document they name, and with any member of their cluster), planted edited copies removed
  (must be 0), decontamination recall (planted problems left in the kept documents) and the
  share of clean documents it removed, wall time of `pipeline run`, MB/s, and peak RSS: of the
  largest process (getrusage of the children) and of the whole process tree (sampled from /proc).

    nice -n 19 .venv/bin/python bench/curate_scale.py --megabytes 200 [--parts 2] [--keep]

The corpus and its truth stay in --work (default /tmp/curate_acc/<megabytes>mb) with --keep, and
a rerun with the same planting arguments reuses them. A 1 GB corpus needs more distinct text
than one interpreter and one virtual environment hold: name more --roots, e.g.
`--roots <the defaults> /usr/include /root/.pyenv/versions/*/lib`.

Real text has near duplicates of its own (vendored copies, versions of one module): they are
counted apart from the planted pairs, with their true Jaccard.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.curate_planting import Truth, shingles, vocabulary, write_planted  # noqa: E402
from data_prep.curate_options import ExactOptions, NearOptions  # noqa: E402
from data_prep.curate_steps import exact_key  # noqa: E402
from data_prep.tasks import ArithmeticTask, format_problem, task_problems  # noqa: E402

SUFFIXES = (".py", ".pyi", ".h", ".c", ".cpp", ".md", ".rst", ".txt")
MIN_WORDS = 100  # an original long enough for copies at a chosen Jaccard
MAX_FILE_BYTES = 1 << 20
SHARES = {"exact": 0.10, "near": 0.10, "edited": 0.05}  # copies per original
THRESHOLD = NearOptions().threshold  # the default: a near removal is right at this true Jaccard
TRUE_DUPLICATE = 0.7  # ... or, allowing for the estimate's noise (+-0.04), at this one
DEFAULT_ROOTS = list(dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")))


class FileTexts(Sequence[str]):
    """Whole files as documents, read when asked for (the corpus is never held in memory)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self.paths[index].read_text(encoding="utf-8")


def original_files(
    roots: list[Path], num_bytes: float, suffixes: tuple[str, ...] = SUFFIXES
) -> list[Path]:
    """Sorted text files under each root in turn, distinct after whitespace normalisation, of at
    least MIN_WORDS words, until they hold `num_bytes` bytes."""
    seen: set[bytes] = set()
    chosen: list[Path] = []
    total = 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in suffixes or not path.is_file():
                continue
            if not 0 < path.stat().st_size <= MAX_FILE_BYTES:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            key = exact_key(text, ExactOptions())
            if len(text.split()) < MIN_WORDS or key in seen:
                continue
            seen.add(key)
            chosen.append(path)
            total += len(text.encode("utf-8"))
            if total >= num_bytes:
                return chosen
    raise SystemExit(
        f"only {total / 1e6:.0f} MB of distinct text files under {', '.join(map(str, roots))}; "
        f"name more --roots or ask for fewer megabytes"
    )


def plant(args: argparse.Namespace, path: Path) -> Truth:
    """Write the planted corpus; its truth."""
    copies = sum(SHARES.values())
    suffixes = tuple(args.suffixes)
    originals = FileTexts(original_files(args.roots, args.megabytes * 1e6 / (1 + copies), suffixes))
    rng = random.Random(args.seed)
    counts = {kind: round(share * len(originals)) for kind, share in SHARES.items()}
    held_out = task_problems(ArithmeticTask(), "test", args.problems, 0)
    extras = [("problem", format_problem(p)) for p in held_out]
    return write_planted(path, originals, rng, vocabulary(rng), counts, extras)


def run_stage(work: Path, corpus: Path, parts: int) -> dict[str, float]:
    """`pipeline run` of the curate stage in a fresh process: seconds and peak RSS in MB."""
    stage = {"kind": "curate", "source": str(corpus), "parts": parts,
             "decontaminate": {"tasks": [{"name": "arithmetic"}]}}  # fmt: skip
    recipe = {"name": "scale", "run_dir": str(work / "runs" / "scale"),
              "tracking": {"mode": "disabled"}, "stages": {"curate": stage}}  # fmt: skip
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "pipeline.cli", "run", str(path)]
    start = time.perf_counter()
    with (work / "pipeline.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        tree_peak = TreePeak(process.pid)
        code = process.wait()
        tree_peak.stop()
    seconds = time.perf_counter() - start
    if code:
        tail = (work / "pipeline.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"pipeline run failed (exit {code}):\n{tail}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "largest_rss_mb": largest, "tree_rss_mb": tree_peak.peak_mb}


class TreePeak:
    """The largest sum of VmRSS over a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.peak_mb = pid, every_s, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            parents: dict[int, int] = {}
            rss: dict[int, int] = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    found = _status(int(entry.name))
                    if found is not None:
                        parents[int(entry.name)], rss[int(entry.name)] = found
            tree = {self.pid}
            for _ in range(8):  # descendants up to 8 levels down
                tree |= {p for p, parent in parents.items() if parent in tree}
            self.peak_mb = max(self.peak_mb, sum(rss.get(p, 0) for p in tree) / 1024)


def _status(pid: int) -> tuple[int, int] | None:
    """(parent pid, VmRSS in kB) of a process, or None when it is gone or a kernel thread."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        return int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0])
    except (OSError, ValueError, KeyError):
        return None


def records(folder: Path) -> Iterator[dict[str, Any]]:
    """The records of a folder's .jsonl.zst shards, streamed."""
    for shard in sorted(folder.glob("*.jsonl.zst")):
        with shard.open("rb") as raw:
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
            yield from (json.loads(line) for line in io.TextIOWrapper(stream, encoding="utf-8"))


def removals(export: Path) -> dict[str, dict[int, int]]:
    """{step: {removed id: the id it names (-1 if none)}}."""
    return {
        step: {r["id"]: r.get("kept_id", -1) for r in records(export / "removed" / step)}
        for step in ("exact", "near", "decontaminate")
    }


def texts_of(corpus: Path, ids: set[int]) -> dict[int, str]:
    with corpus.open(encoding="utf-8") as f:
        return {i: json.loads(line)["text"] for i, line in enumerate(f) if i in ids}


def score(truth: Truth, export: Path, corpus: Path) -> dict[str, Any]:
    """Recall and precision of each step against the planted truth."""
    gone = removals(export)
    duplicates = set(gone["exact"]) | set(gone["near"])
    exact = {max(pair) for pair in truth.pairs("exact")}
    near = {max(pair) for pair in truth.pairs("near")}
    edited = {copy for copy, _ in truth.pairs("edited")}
    planted = {frozenset(pair) for pair in truth.pairs("near")}
    texts = texts_of(corpus, set(gone["near"]) | set(gone["near"].values()))
    sets = ShingleSets(texts)
    to_kept = {i: sets.jaccard(i, kept) for i, kept in gone["near"].items()}
    natural = [i for i in to_kept if frozenset((i, gone["near"][i])) not in planted]
    members: dict[int, list[int]] = {}
    for i, root in gone["near"].items():
        members.setdefault(root, [root]).append(i)
    cluster_best = {  # a member may be linked to the kept one only through others
        i: max(sets.jaccard(i, m) for m in members[gone["near"][i]] if m != i)
        for i, s in to_kept.items()
        if s < THRESHOLD
    }
    problems = {i for i, kind in enumerate(truth.kinds) if kind == "problem"}
    kept = {r["id"] for r in records(export / "kept" / "corpus")}
    return {
        "exact_recall": len(exact & set(gone["exact"])) / max(len(exact), 1),
        "near_recall": len(near & duplicates) / max(len(near), 1),
        "near_pairs_split": _share(not pair <= kept for pair in planted),
        **{
            f"near_precision_{name}_{at}": _share(
                (cluster_best.get(i, s) if name == "cluster" else s) >= at
                for i, s in to_kept.items()
            )
            for name in ("kept", "cluster")
            for at in (THRESHOLD, TRUE_DUPLICATE)
        },
        "near_removed": len(gone["near"]),
        "near_natural": len(natural),
        "near_lowest_to_kept": min(to_kept.values(), default=float("nan")),
        "edited_removed": len(edited & duplicates),
        "edited": len(edited),
        "problems": len(problems),
        "problems_decontaminated": len(problems & set(gone["decontaminate"])),
        "problems_kept": len(problems & kept),
        "clean_removed_share": len(set(gone["decontaminate"]) - problems)
        / (len(truth.kinds) - len(problems)),
    }


def _share(verdicts: Iterable[bool]) -> float:
    found = list(verdicts)
    return sum(found) / max(len(found), 1)


class ShingleSets:
    """True Jaccard similarities of documents by id, each document's shingles hashed once."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts
        self.hashed: dict[int, np.ndarray] = {}

    def jaccard(self, a: int, b: int) -> float:
        x, y = self._hashed(a), self._hashed(b)
        both = len(np.intersect1d(x, y, assume_unique=True))
        return both / max(len(x) + len(y) - both, 1)

    def _hashed(self, index: int) -> np.ndarray:
        if index not in self.hashed:
            found = {hash(shingle) for shingle in shingles(self.texts[index])}
            self.hashed[index] = np.fromiter(found, np.int64, len(found))
        return self.hashed[index]


def planted_corpus(args: argparse.Namespace, work: Path) -> tuple[Path, Truth]:
    """The planted corpus and its truth: written, or the ones a run with the same arguments left
    in `work` (truth.json is written last)."""
    corpus, saved = work / "corpus.jsonl", work / "truth.json"
    key = {k: str(v) for k, v in sorted(vars(args).items()) if k in PLANTING}
    if saved.is_file() and corpus.is_file():
        data = json.loads(saved.read_text())
        if data["key"] == key:
            truth = Truth(data["kinds"], {int(k): v for k, v in data["source_of"].items()})
            truth.num_bytes = data["num_bytes"]
            print(f"reusing the planted corpus in {work}")
            return corpus, truth
    work.mkdir(parents=True, exist_ok=True)
    saved.unlink(missing_ok=True)
    started = time.perf_counter()
    truth = plant(args, corpus)
    data = {"key": key, "kinds": truth.kinds, "source_of": truth.source_of,
            "num_bytes": truth.num_bytes}  # fmt: skip
    saved.write_text(json.dumps(data))
    print(f"planted in {time.perf_counter() - started:.0f}s")
    return corpus, truth


PLANTING = ("megabytes", "problems", "seed", "roots", "suffixes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--parts", type=int, default=1, help="the stage's `parts` (fan-out)")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems planted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the corpus and the run (default /tmp/curate_acc/"
                        "<megabytes>mb); a planted corpus there is reused")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the run and the corpus")
    parser.add_argument("--rescore", action="store_true",
                        help="score the run a --keep run left in --work, without running it")  # fmt: skip
    parser.add_argument("--roots", nargs="+", type=Path, default=DEFAULT_ROOTS,
                        help="folders whose text files are the originals, read in this order")  # fmt: skip
    parser.add_argument("--suffixes", nargs="+", default=list(SUFFIXES),
                        help="the file name endings read as text")  # fmt: skip
    args = parser.parse_args()
    work = args.work or Path(f"/tmp/curate_acc/{args.megabytes:g}mb")
    corpus, truth = planted_corpus(args, work)
    megabytes = truth.num_bytes / 1e6
    print(f"planted: {megabytes:.1f} MB, {len(truth.kinds)} documents "
          f"({sum(k == 'original' for k in truth.kinds)} originals, "
          f"{', '.join(f'{len(truth.pairs(k))} {k}' for k in SHARES)}, {args.problems} problems)")  # fmt: skip
    export = work / "runs" / "scale" / "curate" / "export"
    if args.rescore and export.is_dir():
        run = None
    else:
        shutil.rmtree(work / "runs", ignore_errors=True)
        run = run_stage(work, corpus, args.parts)
    summary = json.loads((export.parent / "stage.json").read_text())["summary"]
    found = score(truth, export, corpus)
    report(found, summary, run, megabytes, args.parts)
    if not args.keep:
        shutil.rmtree(work)


def report(
    found: dict[str, Any],
    summary: dict[str, Any],
    run: dict[str, float] | None,
    mb: float,
    parts: int,
) -> None:
    """Print the figures."""
    print(f"documents: {summary['read_documents']} in, {summary['kept_documents']} out")
    print(f"exact: recall {found['exact_recall']:.4f}")
    print(f"near: recall {found['near_recall']:.4f} (the later document of each planted pair, "
          f"true Jaccard 0.85-0.95, removed as a duplicate), {found['near_pairs_split']:.4f} "
          f"(planted pairs not both kept); "
          f"{found['near_removed']} removed, {found['near_natural']} not in a planted pair; "
          f"lowest true Jaccard to the kept document {found['near_lowest_to_kept']:.3f}")  # fmt: skip
    for at in (THRESHOLD, TRUE_DUPLICATE):
        print(f"  precision, true Jaccard >= {at}: {found[f'near_precision_kept_{at}']:.4f} with "
              f"the kept document it names, {found[f'near_precision_cluster_{at}']:.4f} with a "
              f"member of its cluster")  # fmt: skip
    print(f"edited copies (Jaccard <= 0.5) removed: {found['edited_removed']} of {found['edited']}")
    recall = 1 - found["problems_kept"] / max(found["problems"], 1)
    print(f"decontamination: recall {recall:.4f} ({found['problems_kept']} of {found['problems']} "
          f"planted problems left in the kept documents; {found['problems_decontaminated']} "
          f"removed by decontaminate, the rest earlier as duplicates); clean documents removed "
          f"{100 * found['clean_removed_share']:.3f}%")  # fmt: skip
    if run is None:
        return
    print(f"stage (parts {parts}): {run['seconds']:.1f}s wall, {mb / run['seconds']:.2f} MB/s, "
          f"peak RSS {run['largest_rss_mb']:.0f} MB largest process, "
          f"{run['tree_rss_mb']:.0f} MB process tree (sampled)")  # fmt: skip


if __name__ == "__main__":
    main()
