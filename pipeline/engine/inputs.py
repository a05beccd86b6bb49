"""Stage kinds as specs: a config class, an entry point, typed inputs and a typed output.

An input is what a stage reads from outside itself: an upstream stage whose output type fits, or
an external location (a model or tokenizer directory). The plan resolves every input of every
stage before anything runs, so a wiring mistake (a stage of the wrong type, a stage that is not
upstream, a missing model directory) is one line from `--dry-run`, not an error after hours of
upstream work. The engine reads only these declarations; what a stage computes stays its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.engine.dag import Graph
from pipeline.engine.locations import Location, LocationKind, location_problem, location_signature
from pipeline.engine.rundir import EXPORT_DIR
from pipeline.engine.schema_errors import suggest

if TYPE_CHECKING:
    from pipeline.engine.config import Recipe, StageConfig

# What a stage hands on in its export directory.
OutputType = Literal[
    "tokenizer",  # a Hugging Face tokenizer (and SentencePiece model)
    "tokens",  # token shards with their TokensMeta
    "documents",  # curated JSONL document shards with their DocumentsMeta (data_prep.curate)
    "lm",  # a language model (HF directory; an adapter beside it when trained with one)
    "reward_model",  # a sequence-classification model with one output
    "preferences",  # chosen/rejected pairs with their provenance (pipeline.stages.preferences)
    "images",  # image shards
    "vae",  # an autoencoder for latent diffusion
    "text_embeddings",  # caption embeddings of an images export (pipeline.stages.text_encode)
    "diffusion",  # a diffusers pipeline directory
    "evaluation",  # scores of other stages' outputs
    "table",  # rows of a comparison, a fit or a baseline
    "report",  # HTML
]


@dataclass(frozen=True)
class Input:
    """One input of a stage kind.

    `field` is the dotted config field that may name it (a stage name, or a `{path: DIR}` location
    when `location` is set; '*' walks a list). Left unset, the input is the nearest upstream stage
    whose output is one of `accepts` (when `nearest`), else absent (an error when `required`).
    A value in `builtins` (`builtin:bag-of-words`) is neither: the stage provides it itself, and
    the input is absent.
    """

    name: str
    accepts: tuple[OutputType, ...]
    field: str | None = None
    location: LocationKind | None = None
    required: bool = True
    nearest: bool = True
    many: bool = False
    builtins: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageSpec:
    """Everything the engine knows of a stage kind."""

    config: type[StageConfig]
    run: Callable[..., None]
    output: OutputType | None
    inputs: tuple[Input, ...] = ()
    run_part: Callable[..., None] | None = None
    # Checks between a stage and its resolved inputs a plan can make (a sampler that does not fit
    # the upstream objective, shards of another tokenizer): one line per problem.
    plan_check: Callable[[PlanView], list[str]] | None = None


@dataclass(frozen=True)
class Resolved:
    """An input as the plan resolved it: an upstream stage's export, or an external directory."""

    input: str
    where: str  # the config location that named it (or the stage's `after`)
    stage: str | None = None
    kind: str | None = None
    config: Any = None  # the upstream stage's config (None for a location)
    location: Location | None = None
    run_dir: Path | None = None

    @property
    def path(self) -> Path:
        """The directory to read: the stage's export, or the location itself."""
        if self.location is not None:
            return self.location.resolved()
        assert self.run_dir is not None and self.stage is not None
        return self.run_dir / self.stage / EXPORT_DIR

    @property
    def stage_dir(self) -> Path:
        """An upstream stage's folder (manifest, metrics, checkpoints)."""
        assert self.run_dir is not None and self.stage is not None
        return self.run_dir / self.stage

    @property
    def label(self) -> str:
        """A name for logs and tables: the stage name, or the directory as the recipe gives it
        (unambiguous where two directories share a base name)."""
        return self.stage if self.stage is not None else str(self.location.path)  # type: ignore[union-attr]

    @property
    def external(self) -> bool:
        return self.location is not None


@dataclass
class PlanView:
    """One stage and its resolved inputs, for a spec's plan_check."""

    name: str
    config: Any
    inputs: dict[str, list[Resolved]] = field(default_factory=dict)
    world_size: int = 1  # processes the stage launches with (nproc x nnodes)

    def first(self, name: str) -> Resolved | None:
        return (self.inputs.get(name) or [None])[0]


def spec_of(kind: str) -> StageSpec:
    """The spec a stage kind's module declares (imported on first use)."""
    from pipeline.engine.kinds import stage_module

    return stage_module(kind).SPEC


def values_at(data: Any, parts: list[str], where: str) -> Iterator[tuple[str, Any]]:
    """(dotted location, value) of every value at `parts` in nested models, dicts and lists."""
    if not parts:
        yield where, data
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = data.items() if isinstance(data, dict) else enumerate(data or [])
        for key, value in items:
            yield from values_at(value, rest, f"{where}.{key}")
    elif isinstance(data, dict) and head in data:
        yield from values_at(data[head], rest, f"{where}.{head}")
    elif not isinstance(data, dict | list) and data is not None and hasattr(data, head):
        yield from values_at(getattr(data, head), rest, f"{where}.{head}")


def resolve_inputs(
    recipe: Recipe, name: str, graph: Graph | None = None
) -> tuple[dict[str, list[Resolved]], list[str]]:
    """Every input of stage `name` resolved, and one line per problem found."""
    graph = graph or Graph(recipe)
    cfg = recipe.stages[name]
    run_dir = recipe.resolved_run_dir()
    resolved: dict[str, list[Resolved]] = {}
    problems: list[str] = []
    for spec_input in spec_of(cfg.kind).inputs:
        found, lines = _resolve_one(recipe, graph, name, cfg, spec_input, run_dir)
        resolved[spec_input.name] = found
        problems += lines
    return resolved, problems


def _resolve_one(
    recipe: Recipe, graph: Graph, name: str, cfg: StageConfig, spec: Input, run_dir: Path
) -> tuple[list[Resolved], list[str]]:
    base = f"stages.{name}"
    values = [
        (w, v) for w, v in values_at(cfg, spec.field.split("."), base) if v is not None
    ] if spec.field else []  # fmt: skip
    named = [(w, v) for w, v in values if v not in spec.builtins]
    if values and not named:  # only builtins: the stage provides the input itself
        return [], []
    found: list[Resolved] = []
    problems: list[str] = []
    for where, value in named:
        if isinstance(value, str) and spec.location and not spec.accepts:
            value = Location(path=value)  # a field that only ever holds a path
        if isinstance(value, Location):
            if spec.location is None:
                problems.append(f"{where}: a directory cannot serve as {spec.name}; name a stage")
                continue
            if problem := location_problem(value, spec.location, where):
                problems.append(problem)
            found.append(Resolved(spec.name, where, location=value))
        else:
            ref = value.stage if hasattr(value, "stage") else str(value)
            problem = _stage_problem(recipe, graph, name, where, ref, spec.accepts)
            if problem:
                problems.append(problem)
                continue
            found.append(_stage(spec.name, where, recipe, ref, run_dir))
    if named or not spec.nearest:
        if not named and spec.required:
            problems.append(f"{base}.{spec.field}: required; {_what(spec)}")
        return found, problems
    fits = {s for s in recipe.stages if spec_of(recipe.stages[s].kind).output in spec.accepts}
    nearest = graph.nearest(name, fits.__contains__)
    if nearest is not None:
        return [_stage(spec.name, f"{base}.after", recipe, nearest, run_dir)], problems
    if spec.required:
        problems.append(
            f"{base}: needs an upstream stage that makes {' or '.join(spec.accepts)} "
            f"({_kinds_making(spec.accepts)}); add one to its `after:` list"
            + (f" or set {spec.field}: {{path: DIR}}" if spec.location and spec.field else "")
        )
    return found, problems


def _what(spec: Input) -> str:
    stage = f"name a stage that makes {' or '.join(spec.accepts)}" if spec.accepts else ""
    where = "give {path: DIR}" if spec.location else ""
    return " or ".join(p for p in (stage, where) if p)


def _kinds_making(types: tuple[str, ...]) -> str:
    from pipeline.engine.kinds import KINDS

    return ", ".join(k for k in KINDS if spec_of(k).output in types) or "none"


def _stage(input_name: str, where: str, recipe: Recipe, stage: str, run_dir: Path) -> Resolved:
    cfg = recipe.stages[stage]
    return Resolved(input_name, where, stage=stage, kind=cfg.kind, config=cfg, run_dir=run_dir)


def _stage_problem(
    recipe: Recipe, graph: Graph, name: str, where: str, ref: str, accepts: tuple[str, ...]
) -> str | None:
    wanted = f"a stage that makes {' or '.join(accepts)}"
    if ref not in recipe.stages:
        hint = suggest(ref, list(recipe.stages))
        return f"{where}: no stage {ref!r}{hint}; name {wanted} ({_kinds_making(accepts)})"
    kind = recipe.stages[ref].kind
    output = spec_of(kind).output
    if output not in accepts:
        return (
            f"{where}: {ref!r} is a {kind} stage (it makes {output}); name {wanted} "
            f"({_kinds_making(accepts)})"
        )
    if ref not in graph.upstream(name):
        return f"{where}: {ref!r} is not upstream of {name}; add it to stages.{name}.after"
    return None


def plan_problems(recipe: Recipe) -> list[str]:
    """Every input of every stage resolved and checked, then each spec's plan_check."""
    graph = Graph(recipe)
    problems: list[str] = []
    for name in graph.order:
        resolved, lines = resolve_inputs(recipe, name, graph)
        problems += lines
        check = spec_of(recipe.stages[name].kind).plan_check
        if check is not None and not lines:
            launch = recipe.launch_for(name)
            world = launch.nproc * launch.nnodes
            problems += check(PlanView(name, recipe.stages[name], resolved, world))
    return problems


def external_signatures(recipe: Recipe, name: str) -> dict[str, Any]:
    """The content signatures of the directories a stage reads (for its fingerprint)."""
    cfg = recipe.stages[name]
    signatures: dict[str, Any] = {}
    for spec in spec_of(cfg.kind).inputs:
        if spec.field is None or spec.location is None:
            continue
        for where, value in values_at(cfg, spec.field.split("."), f"stages.{name}"):
            if isinstance(value, str) and not spec.accepts:
                value = Location(path=value)
            if isinstance(value, Location):
                signatures[where] = location_signature(value, spec.location)
    return signatures
