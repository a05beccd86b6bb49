"""The demo's eval stage under two versions of this code: seconds per run, taking turns, and the
ratio with a 95% interval (issue 26's "eval stage before and after").

Each revision is checked out as a git worktree beside the repository, gets a copy of the run
directory (its upstream stages done, so only `eval` runs), and runs `pipeline run RECIPE --only
eval --force` with tracking off in this Python (its own code first on PYTHONPATH). Revisions take
turns within each round so a change in the machine's load hits both alike; a row's figure is the
median over rounds of the first revision's seconds over the other's (above 1: the later one is
faster), with a bootstrap interval over rounds (bench/pretrain_overhead.py's paired_ratio). The
last round's `export/task_outcomes.jsonl` (every problem's completion per model) and
`samples.jsonl` of the two are compared byte for byte.

    .venv/bin/python bench/eval_stage.py runs/demo 1f282e3 HEAD [--rounds 5]

(`runs/demo`: a finished `make demo`; 1f282e3: the code before issue 26's first commit.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pretrain_overhead import paired_ratio

ROOT = Path(__file__).resolve().parent.parent
STAGE_SECONDS = re.compile(r"│ eval\s+│ eval\s+│ ran\s+│ ([0-9.]+)(s|m)")


def worktree(revision: str, folder: Path, run_dir: Path) -> Path:
    """A checkout of `revision` in `folder` with a copy of the run directory at runs/<name>."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision],
                   check=True, capture_output=True)  # fmt: skip
    shutil.copytree(run_dir, folder / "runs" / run_dir.name, symlinks=True)
    return folder


def eval_seconds(checkout: Path, recipe: str) -> float:
    """The eval stage's own duration (the run's table), from a fresh process in `checkout`."""
    command = [sys.executable, "-m", "pipeline.cli", "run", recipe, "--only", "eval", "--force",
               "-o", "tracking.mode=disabled"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: eval failed: {done.stderr.strip().splitlines()[-1:]}")
    found = STAGE_SECONDS.search(done.stdout)
    if found is None:  # a table that no longer shows the stage: the process's wall time
        return time.perf_counter() - started
    value = float(found.group(1))
    return value * 60 if found.group(2) == "m" else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished demo run (runs/demo)")
    parser.add_argument("before", help="git revision of the code before")
    parser.add_argument("after", help="git revision of the code after")
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
        trees = {
            name: worktree(rev, Path(tmp) / name, args.run_dir.resolve())
            for name, rev in (("before", args.before), ("after", args.after))
        }
        try:
            seconds: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    seconds[name].append(eval_seconds(tree, args.recipe))
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{name} {s[-1]:.1f} s" for name, s in seconds.items()))  # fmt: skip
            ratio, low, high = paired_ratio(seconds["before"], seconds["after"])
            print(f"eval stage: {args.before} {statistics.mean(seconds['before']):.1f} s, "
                  f"{args.after} {statistics.mean(seconds['after']):.1f} s (means of "
                  f"{args.rounds}); before / after {ratio:.2f} [{low:.2f}, {high:.2f}]")  # fmt: skip
            exports = {name: tree / "runs" / args.run_dir.name / "eval" / "export"
                       for name, tree in trees.items()}  # fmt: skip
            for file in ("task_outcomes.jsonl", "samples.jsonl"):
                same = all((e / file).is_file() for e in exports.values()) and (
                    (exports["before"] / file).read_bytes()
                    == (exports["after"] / file).read_bytes()
                )
                print(f"{file}: {'identical' if same else 'differs'}")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)  # fmt: skip


if __name__ == "__main__":
    main()
