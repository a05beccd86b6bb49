"""`pipeline` command line: parses arguments, then calls the engine. No logic lives here."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.engine.checks import deepspeed_problems, local_run_problems, preflight
from pipeline.engine.config import (
    Recipe,
    bundled_recipes,
    bundled_recipes_dir,
    find_recipe,
    load_recipe,
    read_recipe,
    stage_kinds,
)
from pipeline.engine.config_docs import describe_config
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.schema_errors import suggest

console = Console(stderr=False, highlight=False)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _fmt_metric(manifest: dict[str, Any]) -> str:
    name = manifest.get("headline")
    value = (manifest.get("summary") or {}).get(name) if name else None
    if value is None:
        return "-"
    return f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.engine.graph import plan, rescan
    from pipeline.engine.runner import run_recipe

    recipe = load_recipe(args.recipe, args.override)
    preflight(recipe)
    if problems := local_run_problems(recipe):
        raise RecipeError("\n".join(problems))
    if args.dry_run:
        with rescan(args.rescan):
            steps = plan(recipe, from_stage=args.from_stage, only=args.only, force=args.force)
        table = Table(title=f"plan for {recipe.name} ({recipe.resolved_run_dir()})")
        for col in ("stage", "kind", "action", "why"):
            table.add_column(col)
        for s in steps:
            table.add_row(s.name, s.kind, "[bold]run[/]" if s.run else "skip", s.reason)
        console.print(table)
        return 0
    started = time.perf_counter()

    def announce(step: Any) -> None:
        if step.run:
            console.print(f"[bold cyan]>> {step.name}[/] ({step.kind}): {step.reason}")
        else:
            console.print(f"[dim]-- {step.name}: skip, {step.reason}[/]")

    from pipeline.engine import preempt
    from pipeline.engine.lock import run_dir_lock
    from pipeline.engine.slurm import refuse_active_jobs

    with run_dir_lock(recipe.resolved_run_dir()), rescan(args.rescan):
        refuse_active_jobs(recipe, list(recipe.stages), "run")
        preempt.install_interrupts()
        results = run_recipe(
            recipe, from_stage=args.from_stage, only=args.only, force=args.force, on_step=announce
        )
    table = Table(title=f"{recipe.name}: done in {_fmt_duration(time.perf_counter() - started)}")
    for col in ("stage", "kind", "action", "duration", "metric"):
        table.add_column(col)
    from pipeline.engine.manifest import read_manifest

    notes = []
    for step, manifest in results:
        manifest = manifest or read_manifest(recipe.resolved_run_dir() / step.name)
        if manifest.get("note"):
            notes.append(f"{step.name}: {manifest['note']}")
        table.add_row(
            step.name,
            step.kind,
            "ran" if step.run else "skipped",
            _fmt_duration(manifest.get("duration_s")) if step.run else "-",
            _fmt_metric(manifest),
        )
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True)
    report = next(
        (
            recipe.resolved_run_dir() / n / "index.html"
            for n, c in recipe.stages.items()
            if c.kind == "report"
        ),
        None,
    )
    if report and report.exists():
        console.print(f"report: {report}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.engine.lock import run_dir_lock
    from pipeline.engine.slurm import submit

    recipe = load_recipe(args.recipe, args.override)
    preflight(recipe)
    # Even --dry-run: it writes recipe.yaml and the sbatch files, which a local run reads.
    with run_dir_lock(recipe.resolved_run_dir()):
        submissions = submit(
            recipe, from_stage=args.from_stage, only=args.only, dry_run=args.dry_run
        )
    verb = "would submit" if args.dry_run else "submitted"
    table = Table(title=f"{recipe.name}: {verb} ({recipe.resolved_run_dir()})")
    for col in ("stage", "kind", "job", "after", "why"):
        table.add_column(col)
    for s in submissions:
        job = s.job_id or ("[dim]dry run[/]" if s.script else "[dim]skip[/]")
        table.add_row(s.stage, s.kind, job, ",".join(s.after) or "-", s.reason)
    console.print(table)
    scripts = [s.script for s in submissions if s.script]
    if not scripts:
        console.print("nothing to submit: every stage is up to date")
    elif args.dry_run:
        for script in scripts:
            console.print(f"sbatch file: {script}")
    return 0


def _recipe_for_status(target: str, overrides: list[str]) -> Recipe:
    path = Path(target)
    if path.is_dir():
        from pipeline.engine.rundir import RECIPE_FILE

        if not (path / RECIPE_FILE).is_file():
            raise RecipeError(
                f"{path}: not a run directory (no {RECIPE_FILE}); pass a run dir or a recipe"
            )
        return load_recipe(path / RECIPE_FILE, overrides)
    return load_recipe(target, overrides)


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.engine.graph import fingerprints, rescan, stage_state
    from pipeline.engine.manifest import read_manifest, verify_outputs
    from pipeline.engine.slurm import ENDED_STATES, queue_column

    recipe = _recipe_for_status(args.target, args.override)
    if problems := deepspeed_problems(recipe):  # fingerprints read the DeepSpeed file
        raise RecipeError("\n".join(problems))
    run_dir = recipe.resolved_run_dir()
    with rescan(args.rescan or args.verify):
        prints = fingerprints(recipe)
    table = Table(title=f"{recipe.name} ({run_dir})")
    for col in ("stage", "kind", "status", "fresh", "duration", "tries", "queue", "metric"):
        table.add_column(col)
    for name, cfg in recipe.stages.items():
        manifest = read_manifest(run_dir / name)
        fresh, reason = stage_state(run_dir, name, prints[name])
        if fresh and args.verify:
            problem = verify_outputs(run_dir / name, manifest.get("outputs", {}), deep=True)
            fresh, reason = problem is None, problem or "verified"
        status, queue = manifest.get("status", "-"), queue_column(manifest)
        if status == "failed" and manifest.get("error"):
            status = f"failed: {manifest['error'][:60]}"
        job_state = queue.split(" ")[1].rstrip(":") if " " in queue else ""  # "ID STATE..."
        if status == "running" and job_state in ENDED_STATES:
            status = "stopped (job ended)"  # killed with its job: never reached its manifest
        table.add_row(
            name,
            cfg.kind,
            status,
            "fresh" if fresh else f"stale ({reason})",
            _fmt_duration(manifest.get("duration_s")),
            str(manifest.get("attempts", 0)),
            queue,
            _fmt_metric(manifest),
        )
    console.print(table)
    from pipeline.engine.lock import describe, held_by

    holder = held_by(run_dir)
    if holder:
        console.print(f"in use by {describe(holder)}", soft_wrap=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eval.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"{run_dir}: no such run directory; pass runs/<name>")
    console.print(f"report: {write_report(run_dir.absolute())}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    root = bundled_recipes_dir()
    table = Table(title=f"bundled recipes ({root})")
    table.add_column("recipe")
    table.add_column("description")
    for path in bundled_recipes():
        try:
            description = read_recipe(path).get("description", "")
        except PipelineError as exc:
            description = f"(invalid: {exc})"
        table.add_row(str(path.relative_to(root).with_suffix("")), str(description).strip())
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    kinds = stage_kinds()
    if args.target in kinds and not Path(args.target).is_file():
        if args.override:
            raise RecipeError(
                f"-o {args.override[0]}: {args.target} is a stage kind; overrides apply to a "
                f"recipe, e.g. pipeline show demo -o {args.override[0]}"
            )
        show_kind(args.target)
        return 0
    try:
        path = find_recipe(args.target)
    except RecipeError:
        names = [
            *kinds,
            *(str(p.relative_to(bundled_recipes_dir()).with_suffix("")) for p in bundled_recipes()),
        ]
        raise RecipeError(
            f"{args.target}: not a stage kind or a recipe{suggest(args.target, names)}; pass a "
            f"kind ({', '.join(sorted(kinds))}) or a recipe path or name (see `pipeline recipes`)"
        ) from None
    console.out(load_recipe(path, args.override).to_yaml(), end="", highlight=False)
    return 0


def show_kind(kind: str) -> None:
    """Print every field of a stage kind's config: dotted name, type, default, description."""
    docs = describe_config(stage_kinds()[kind])
    table = Table(title=f"stage kind {kind}: fields (set them under stages.<name>)", expand=True)
    table.add_column("field", no_wrap=True, min_width=max(len(d.name) for d in docs))
    table.add_column("type", overflow="fold", ratio=3)
    table.add_column("default", overflow="fold", ratio=2)
    table.add_column("description", overflow="fold", ratio=6)
    for doc in docs:
        table.add_row(*(Text(cell) for cell in doc))  # Text: `list[str]` is not rich markup
    console.print(table)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the problem and where to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pipeline", description="Staged LLM/diffusion pretraining pipeline."
    )
    rescan_help = "stat every input file, not only those in changed folders (sees in-place edits)"
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-o",
            "--override",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted override, e.g. -o stages.pretrain.optim.lr=3e-4 (repeatable)",
        )

    def selection(p: argparse.ArgumentParser) -> None:
        """The recipe and which of its stages to (re)run: shared by run and submit."""
        p.add_argument("recipe", help="recipe YAML path or bundled name (e.g. demo)")
        p.add_argument(
            "--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything after it"
        )
        p.add_argument(
            "--only",
            metavar="S1,S2",
            type=lambda text: [s for s in text.split(",") if s] or None,
            help="rerun only these stages (upstream must be done)",
        )

    run = sub.add_parser("run", help="run the stages of a recipe that are not up to date")
    selection(run)
    run.add_argument(
        "--force", action="store_true", help="rerun every stage, ignoring fingerprints"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (run/skip and why) and exit"
    )
    run.add_argument("--rescan", action="store_true", help=rescan_help)
    overrides(run)
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser(
        "submit", help="submit the stages that are not up to date as dependent Slurm jobs"
    )
    selection(submit)
    submit.add_argument(
        "--dry-run", action="store_true", help="write the sbatch files, print them, submit nothing"
    )
    overrides(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser(
        "status", help="table of stages: status, fresh or stale, duration, metric"
    )
    status.add_argument("target", help="run directory or recipe")
    status.add_argument(
        "--verify", action="store_true", help="re-checksum every output (implies --rescan)"
    )
    status.add_argument("--rescan", action="store_true", help=rescan_help)
    overrides(status)
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write RUN_DIR/report/index.html")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    recipes = sub.add_parser("recipes", help="list bundled recipes")
    recipes.set_defaults(func=cmd_recipes)

    show = sub.add_parser(
        "show", help="a stage kind's fields (type, default, description) or a resolved recipe"
    )
    show.add_argument(
        "target", metavar="KIND|RECIPE", help="stage kind (e.g. pretrain) or recipe path or name"
    )
    overrides(show)
    show.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.engine.context import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(
                f"error: {line}" if line and not line.startswith((" ", "Traceback")) else line,
                file=sys.stderr,
            )
        return exc.exit_code
    except OSError as exc:
        from pipeline.engine.diskfull import FULL_ERRNOS

        if exc.errno not in FULL_ERRNOS:
            raise
        print(f"error: {exc.filename or 'the run directory'}: {exc.strerror}; free space, then "
              f"rerun the same command to resume", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        from pipeline.engine.preempt import interrupt_signal

        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + (interrupt_signal() or signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
