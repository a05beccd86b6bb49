"""Checks of a recipe that can be made before any stage runs, so `run --dry-run` finds them too.

Each check returns one line per problem (the input, the problem, the fix); `preflight` raises them
together as a RecipeError (exit 2). Nothing here writes to the run directory: the writability
probe creates and removes a temporary folder beside where the run directory would be.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.engine.config import Recipe, StageConfig
from pipeline.engine.dag import Graph
from pipeline.engine.errors import PipelineError, RecipeError
from pipeline.engine.inputs import plan_problems, spec_of

DEEPSPEED_ZERO_STAGES = (0, 1, 2, 3)
# The keys of a DeepSpeed JSON that must agree with a stage's batch ("auto" agrees with any).
DEEPSPEED_BATCH_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
)


def preflight(recipe: Recipe) -> None:
    """Raise RecipeError listing every problem found before running (run, dry run and submit)."""
    problems = [
        *run_dir_problems(recipe.resolved_run_dir()),
        *tracking_problems(recipe),
        *slurm_problems(recipe),
        *deepspeed_problems(recipe),
        *plan_problems(recipe),
        *report_problems(recipe),
        *input_problems(recipe),
    ]
    if problems:
        raise RecipeError("\n".join(problems))


def local_run_problems(recipe: Recipe) -> list[str]:
    """`pipeline run` starts every stage on this machine: a stage spread over several nodes
    would wait for nodes that never come (only `pipeline submit` gives it them)."""
    return [
        f"stages.{name}: launch.nnodes is {launch.nnodes}, but `pipeline run` starts stages on "
        f"this machine only; use `pipeline submit` (Slurm) or launch.nnodes: 1"
        for name in recipe.stages
        if (launch := recipe.launch_for(name)).nnodes > 1
    ]


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


def tracking_problems(recipe: Recipe) -> list[str]:
    """What W&B would refuse when the first stage starts: online mode without a key, a project
    name it does not take (checked by wandb's own settings)."""
    from pipeline.engine.tracking import resolve_mode, wandb_key_configured

    tracking = recipe.tracking
    mode = resolve_mode(tracking)
    if mode == "disabled":
        return []
    problems = []
    if mode == "online" and not wandb_key_configured():
        problems.append(
            "tracking.mode: online, but no W&B key is configured (WANDB_API_KEY or ~/.netrc); "
            "run `wandb login`, or use mode: auto (offline without a key)"
        )
    import wandb
    from wandb.errors import UsageError

    try:
        wandb.Settings(project=tracking.project)
    except (UsageError, ValueError) as exc:
        problems.append(f"tracking.project: {str(exc).splitlines()[0]}; choose another name")
    return problems


def slurm_problems(recipe: Recipe) -> list[str]:
    """Each stage's Slurm job fits its launch, found otherwise only once the job has waited in
    the queue: a process drives one GPU, so a rank past the last GPU fails; the warning signal
    comes before the time limit, else the job checkpoints and requeues as soon as it starts."""
    problems: dict[str, None] = {}  # a recipe-wide setting is reported once
    for name, cfg in recipe.stages.items():
        launch, slurm = recipe.launch_for(name), recipe.slurm_for(name)
        gpus, where = slurm.gpus_per_node, "launch.nproc"
        if cfg.launch is not None and cfg.launch.nproc is not None:
            where = f"stages.{name}.launch.nproc"
        if cfg.distributed and gpus and launch.nproc > gpus:
            problems[
                f"{where}: {launch.nproc} processes per node, but stage {name}'s Slurm job asks "
                f"for {gpus} GPUs per node (slurm.gpus_per_node); use nproc: {gpus} or ask for "
                f"more GPUs"
            ] = None
        limit = time_limit_seconds(slurm.time)
        if limit is not None and slurm.signal_seconds >= limit:
            own = cfg.slurm is not None and (cfg.slurm.time or cfg.slurm.signal_seconds)
            section = f"stages.{name}.slurm" if own else "slurm"
            problems[
                f"{section}.signal_seconds: {slurm.signal_seconds} s is not below the time limit "
                f"{slurm.time} ({limit} s), so the warning would come as the job starts; lower "
                f"signal_seconds or raise time"
            ] = None
    return list(problems)


def time_limit_seconds(time: str) -> int | None:
    """An sbatch --time value in seconds (MINUTES, MINUTES:SS, HH:MM:SS, DAYS-HH[:MM[:SS]]),
    as SlurmTime admits it; None when unlimited."""
    if time in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (*parts, 0, 0)[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, minutes, seconds = 0, parts[0], (*parts[1:], 0)[0]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def deepspeed_problems(recipe: Recipe) -> list[str]:
    """Every `launch.deepspeed_config` in use is a readable JSON object with a real ZeRO stage,
    whose batch keys agree with each stage that uses it."""
    paths = {
        recipe.launch_for(name).deepspeed_config
        for name, cfg in recipe.stages.items()
        if cfg.distributed and recipe.launch_for(name).engine == "deepspeed"
    }
    problems = [p for path in sorted(p for p in paths if p) if (p := _deepspeed_file(path))]
    if problems:
        return problems
    return [p for name, cfg in recipe.stages.items() if (p := _deepspeed_batch(recipe, name, cfg))]


def _deepspeed_batch(recipe: Recipe, name: str, cfg: StageConfig) -> str | None:
    """The batch keys of a training stage's DeepSpeed JSON against its micro batch,
    accumulation and world size, which its engine would refuse only once the stage starts."""
    launch = recipe.launch_for(name)
    micro, accum = getattr(cfg, "micro_batch_size", None), getattr(cfg, "grad_accum_steps", None)
    path = launch.deepspeed_config
    if not (cfg.distributed and launch.engine == "deepspeed" and path and micro and accum):
        return None
    expert = json.loads(Path(path).read_text(encoding="utf-8"))  # valid: _deepspeed_file said so
    problem = deepspeed_batch_problem(expert, micro, accum, launch.nproc * launch.nnodes)
    return f"stages.{name}: launch.deepspeed_config {path}: {problem}" if problem else None


def deepspeed_batch_problem(expert: dict, micro: int, accum: int, world: int) -> str | None:
    """Why a DeepSpeed JSON's batch keys disagree with micro batch x accumulation x world size
    ("auto", or no key, agrees with any), or None."""
    ours = dict(zip(DEEPSPEED_BATCH_KEYS, (micro, accum, micro * accum * world), strict=True))
    for key, value in ours.items():
        theirs = expert.get(key, "auto")
        if theirs not in ("auto", value):
            return (
                f"{key}={theirs} disagrees with the recipe's {value} (micro_batch_size x "
                f'grad_accum_steps x world size); set it to "auto" or change the recipe'
            )
    return None


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


def report_problems(recipe: Recipe) -> list[str]:
    """A report comes after every stage whose results it shows (evaluations and tables): one
    that is not upstream may finish after the report, which then leaves its results out."""
    graph = Graph(recipe)
    problems = []
    for name, cfg in recipe.stages.items():
        if spec_of(cfg.kind).output != "report":
            continue
        upstream = graph.upstream(name)
        missing = [
            stage
            for stage, other in recipe.stages.items()
            if spec_of(other.kind).output in ("evaluation", "table") and stage not in upstream
        ]
        if missing:
            problems.append(
                f"stages.{name}.after: leaves out {', '.join(missing)}, whose results the report "
                f"shows; add them, or the report may be written before they finish"
            )
    return problems


def input_problems(recipe: Recipe) -> list[str]:
    """Each stage's inputs exist and start well (the files it reads, their first records)."""
    problems = []
    for name, cfg in recipe.stages.items():
        try:
            cfg.check_inputs()  # data_signature() is read once, by the plan's fingerprints
        except PipelineError as exc:
            problems.append(_in_stage(name, cfg, str(exc).splitlines()[0]))
    return problems


def _in_stage(name: str, cfg: StageConfig, line: str) -> str:
    """A stage's input error as a recipe key: `data: F: ...` of stage sft is `stages.sft.data:
    F: ...`; a line that names no field of the stage gets the stage alone."""
    if line.startswith("stages."):
        return line
    field = re.match(r"[A-Za-z_]\w*", line)
    if field is not None and field.group() in type(cfg).model_fields:
        return f"stages.{name}.{line}"
    return f"stages.{name}: {line}"
