"""Typed recipe schema, YAML loading and dotted overrides.

A recipe is validated in two steps: the top level (name, tracking, launch, slurm) against
`Recipe`, then each stage against the config class of its `kind`. Every error is reported as one
line naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from pipeline.engine.errors import RecipeError
from pipeline.engine.kinds import KINDS, stage_module
from pipeline.engine.rundir import RECIPE_FILE
from pipeline.engine.schema_errors import (
    PathText,
    SbatchOption,
    SlurmMem,
    SlurmName,
    SlurmTime,
    format_errors,
    suggest,
)
from pipeline.engine.sweeps import expand_sweeps
from pipeline.engine.yaml_io import DuplicateKey, UniqueKeyLoader, substitute_vars

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


Engine = Literal["ddp", "fsdp", "deepspeed"]


class LaunchConfig(Strict):
    """How a stage's processes are started and how the model is distributed over them."""

    nproc: int = Field(1, ge=1, description="processes per node")
    nnodes: int = Field(1, ge=1, description="nodes (Slurm)")
    engine: Engine = "ddp"
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (engine: deepspeed)")
    offload_optimizer: bool = Field(False, description="DeepSpeed: optimizer state in CPU memory")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3: parameters in CPU memory")
    deepspeed_config: PathText | None = Field(
        None, description="expert: a DeepSpeed JSON whose values win"
    )

    @model_validator(mode="after")
    def _check_engine_options(self) -> LaunchConfig:
        deepspeed_only = ("offload_optimizer", "offload_params", "deepspeed_config")
        if self.engine != "deepspeed":
            used = [name for name in deepspeed_only if getattr(self, name)]
            if used:
                raise ValueError(
                    f"{', '.join(used)} need engine: deepspeed (engine is {self.engine})"
                )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3 (ZeRO-1/2 keep full parameters)")
        if self.deepspeed_config:
            self.deepspeed_config = str(Path(self.deepspeed_config).absolute())
        return self


class LaunchOverride(Strict):
    """Per-stage override of the recipe's launch section; unset fields inherit."""

    nproc: int | None = Field(None, ge=1)
    nnodes: int | None = Field(None, ge=1)
    engine: Engine | None = None
    zero_stage: Literal[1, 2, 3] | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None
    deepspeed_config: str | None = None


class TrackingConfig(Strict):
    """W&B settings; metrics.jsonl is written whatever the mode."""

    project: str = "pretrain-pipeline"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []


class SlurmConfig(Strict):
    """Recipe-wide sbatch settings (used by `pipeline submit`)."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: SlurmMem | None = None
    time: SlurmTime = "04:00:00"
    extra: list[SbatchOption] = Field(
        [], description="extra sbatch options, e.g. --constraint=a100"
    )
    signal_seconds: int = Field(
        120, ge=1, description="warning signal this long before the time limit or preemption"
    )
    max_requeues: int = Field(3, ge=0, description="times a preempted job requeues itself")


class SlurmOverride(Strict):
    """Per-stage override of the recipe's slurm section; unset fields inherit."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: SlurmMem | None = None
    time: SlurmTime | None = None
    extra: list[SbatchOption] | None = None
    signal_seconds: int | None = Field(None, ge=1)
    max_requeues: int | None = Field(None, ge=0)


class StageConfig(Strict):
    """Fields every stage has; each stage kind subclasses this with its own fields."""

    kind: str
    after: list[str] = []
    seed: int | None = Field(None, description="this stage's seed; default: the recipe's")
    launch: LaunchOverride | None = None
    slurm: SlurmOverride | None = None

    distributed: ClassVar[bool] = False  # True: may start several processes (training stages)

    def data_signature(self) -> dict[str, Any]:
        """Extra inputs to the fingerprint that are not in the config (e.g. source file stats)."""
        return {}

    def recipe_signature(self, recipe: Recipe) -> dict[str, Any]:
        """What it reads from other stages' configs, for its fingerprint (curate: their tasks)."""
        return {}

    def check_inputs(self) -> None:
        """Cheap checks of the inputs this stage reads (files exist, first records parse), made
        before anything runs; raise PipelineError naming the input, the problem and the fix."""


class Recipe(Strict):
    """A whole recipe after validation: stage configs are instances of their kind's class."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    vars: dict[str, Any] = Field({}, description="recipe variables, used as ${name}")
    run_dir: PathText | None = None
    seed: int = 0
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()
    slurm: SlurmConfig = SlurmConfig()
    stages: dict[str, SerializeAsAny[StageConfig]]

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}").absolute()

    def launch_for(self, stage: str) -> LaunchConfig:
        """The effective launch settings of a stage (stage override over recipe default)."""
        cfg = self.stages[stage]
        if not cfg.distributed:
            return LaunchConfig()
        update = cfg.launch.model_dump(exclude_none=True) if cfg.launch else {}
        return LaunchConfig.model_validate({**self.launch.model_dump(), **update})

    def slurm_for(self, stage: str) -> SlurmConfig:
        """The effective sbatch settings of a stage (stage override over recipe default)."""
        override = self.stages[stage].slurm
        update = override.model_dump(exclude_none=True) if override else {}
        return SlurmConfig.model_validate({**self.slurm.model_dump(), **update})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def bundled_recipes_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "recipes"


def bundled_recipes() -> list[Path]:
    """The bundled recipe files; a file or folder whose name starts with `_` is a base for
    `extends:`, not a recipe of its own, and is left out."""
    root = bundled_recipes_dir()
    return sorted(
        p for p in root.rglob("*.yaml") if "/_" not in f"/{p.relative_to(root).as_posix()}"
    )


def find_recipe(spec: str | Path) -> Path:
    """A recipe path, or a bundled recipe name such as `demo` or `llm/gpt2`."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir() and (path / RECIPE_FILE).is_file():
        return path / RECIPE_FILE
    for candidate in (bundled_recipes_dir() / f"{spec}.yaml", bundled_recipes_dir() / str(spec)):
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"{spec}: no such recipe file or run directory; "
        f"pass a YAML path or a bundled name (see `pipeline recipes`)"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping; syntax and encoding problems are one-line RecipeErrors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text ({exc.reason}); save the recipe as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise RecipeError(f"{path} line {exc.line}: {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: malformed YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with name and stages")
    return data


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file with its `extends:` chain resolved: the base, then this file merged on top."""
    chain = (*chain, path.resolve())
    data = read_yaml(path)
    spec = data.pop("extends", None)
    if spec is None:
        return data
    base = _extends_path(spec, path)
    if base.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base.resolve()))
        raise RecipeError(f"{path}: extends: cycle {cycle}; remove one of these `extends`")
    return deep_merge(read_recipe(base, chain), data)


def _extends_path(spec: Any, path: Path) -> Path:
    """The file an `extends:` value names: a path relative to `path`'s folder, or a bundled name."""
    if not isinstance(spec, str) or not spec:
        raise RecipeError(f"{path}: extends: got {spec!r}; expected a recipe path or bundled name")
    root = bundled_recipes_dir()
    for candidate in (path.parent / spec, root / f"{spec}.yaml", root / spec):
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"{path}: extends: {spec}: no such file (looked in {path.parent} and {root}); "
        f"give a path relative to {path.name} or a bundled recipe name"
    )


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`: mappings merge key by key, anything else (lists, null) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, lists, booleans)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(
                f"-o {item}: expected KEY=VALUE, e.g. -o stages.pretrain.max_steps=50"
            )
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                path = ".".join(parts[: i + 1])
                raise RecipeError(f"-o {item}: {path} is not a mapping, cannot set {key}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


@cache
def stage_kinds() -> dict[str, type[StageConfig]]:
    """Kind -> its config class (every stage module is imported on the first call)."""
    return {kind: stage_module(kind).SPEC.config for kind in KINDS}


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override, validate and resolve a recipe; raises RecipeError with one-line messages."""
    path = find_recipe(spec)
    data = apply_overrides(read_recipe(path), list(overrides or []))
    return validate_recipe(substitute_vars(data, str(path)), source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise RecipeError(
            f"{source}: stages: missing or empty; add a mapping of stage name -> config"
        )
    kinds = stage_kinds()
    raw_stages = expand_sweeps(raw_stages, kinds, source)
    errors: list[str] = []
    try:
        head = Recipe.model_validate({**data, "stages": {}})
    except ValidationError as exc:
        errors += format_errors(exc, Recipe, prefix=())
        head = None
    stages: dict[str, StageConfig] = {}
    for name, raw in raw_stages.items():
        where = ("stages", str(name))
        if not isinstance(raw, dict):
            errors.append(f"{'.'.join(where)}: expected a mapping with a kind, got {raw!r}")
            continue
        kind = raw.get("kind")
        if kind not in kinds:
            hint = suggest(str(kind), kinds)
            got = "missing" if kind is None else f"unknown kind {kind!r}"
            errors.append(
                f"{'.'.join(where)}.kind: {got}{hint} (known: {', '.join(sorted(kinds))})"
            )
            continue
        if not re.match(NAME_PATTERN, str(name)):
            errors.append(f"{'.'.join(where)}: stage names use letters, digits, '_', '-', '.'")
        try:
            stages[str(name)] = kinds[kind].model_validate(raw)
        except ValidationError as exc:
            errors += format_errors(exc, kinds[kind], prefix=where)
    if head is not None:
        for name in stages:
            try:
                head.model_copy(update={"stages": stages}).launch_for(name)
            except ValidationError as exc:
                errors += format_errors(exc, LaunchConfig, prefix=("stages", name, "launch"))
    if errors:
        raise RecipeError("\n".join(f"{source}: {e}" for e in errors))
    assert head is not None
    recipe = head.model_copy(update={"stages": stages})
    topo_order(recipe)
    return resolve_paths(recipe)


def topo_order(recipe: Recipe) -> list[str]:
    """Stages in dependency order (recipe order among equals); rejects unknown names and cycles."""
    names = list(recipe.stages)
    for name, cfg in recipe.stages.items():
        for dep in cfg.after:
            if dep not in recipe.stages:
                raise RecipeError(
                    f"stages.{name}.after: unknown stage {dep!r}{suggest(dep, names)} "
                    f"(stages: {', '.join(names)})"
                )
            if dep == name:
                raise RecipeError(f"stages.{name}.after: a stage cannot come after itself")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise RecipeError(f"stages: dependency cycle {cycle}; remove one `after` entry")
        state[name] = "visiting"
        for dep in recipe.stages[name].after:
            visit(dep, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def resolve_paths(recipe: Recipe) -> Recipe:
    """Make the run directory absolute so every process (and Slurm job) agrees on it."""
    return recipe.model_copy(update={"run_dir": str(recipe.resolved_run_dir())})
