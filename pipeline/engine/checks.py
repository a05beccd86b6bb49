"""Checks of a recipe that can be made before any stage runs, so `run --dry-run` finds them too.

Each check returns one line per problem (the input, the problem, the fix); `preflight` raises them
together as a RecipeError (exit 2). Nothing here writes to the run directory: the writability
probe creates and removes a temporary folder beside where the run directory would be.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.engine.config import Recipe
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.inputs import plan_problems

DEEPSPEED_ZERO_STAGES = (0, 1, 2, 3)


def preflight(recipe: Recipe) -> None:
    """Raise RecipeError listing every problem found before running (run, dry run and submit)."""
    problems = [
        *run_dir_problems(recipe.resolved_run_dir()),
        *deepspeed_problems(recipe),
        *plan_problems(recipe),
        *input_problems(recipe),
    ]
    if problems:
        raise RecipeError("\n".join(problems))


def run_dir_problems(run_dir: Path) -> list[str]:
    """The run directory exists as a writable folder, or can be created."""
    fix = "choose a writable run_dir (recipe key run_dir, or -o run_dir=PATH)"
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == run_dir else f"cannot be created: {existing} is"
        return [f"run_dir {run_dir}: {what} a file, not a folder; {fix}"]
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".pipeline-probe-", dir=existing))
    except OSError as exc:
        what = "not writable" if existing == run_dir else f"cannot be created in {existing}"
        return [f"run_dir {run_dir}: {what} ({exc.strerror}); {fix}"]
    return []


def deepspeed_problems(recipe: Recipe) -> list[str]:
    """Every `launch.deepspeed_config` in use is a readable JSON object with a real ZeRO stage."""
    paths = {
        recipe.launch_for(name).deepspeed_config
        for name, cfg in recipe.stages.items()
        if cfg.distributed and recipe.launch_for(name).engine == "deepspeed"
    }
    return [problem for path in sorted(p for p in paths if p) if (problem := _deepspeed_file(path))]


def _deepspeed_file(path: str) -> str | None:
    where = f"launch.deepspeed_config {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{where}: no such file; fix the path or remove the key"
    except IsADirectoryError:
        return f"{where}: is a folder; name a DeepSpeed JSON file"
    except OSError as exc:
        return f"{where}: cannot read ({exc.strerror}); fix its permissions"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{where}: not valid JSON ({exc}); fix the file"
    if not isinstance(data, dict):
        return f"{where}: must be a JSON object, got {type(data).__name__}; fix the file"
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return f"{where}: zero_optimization must be an object, got {zero!r}; fix the file"
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in DEEPSPEED_ZERO_STAGES:
        allowed = ", ".join(map(str, DEEPSPEED_ZERO_STAGES))
        return f"{where}: zero_optimization.stage {stage!r} does not exist; use one of {allowed}"
    return None


def input_problems(recipe: Recipe) -> list[str]:
    """Each stage's inputs exist and start well (the files it reads, their first records)."""
    problems = []
    for cfg in recipe.stages.values():
        try:
            cfg.check_inputs()  # data_signature() is read once, by the plan's fingerprints
        except PipelineError as exc:
            problems.append(str(exc).splitlines()[0])
    return problems
