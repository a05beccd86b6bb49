"""The stage DAG: fingerprints, and which stages a run must execute and why (order: topo_order)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.config import Recipe, StageConfig, topo_order
from pipeline.engine.dag import Graph
from pipeline.engine.errors import RecipeError
from pipeline.engine.inputs import external_signatures
from pipeline.engine.manifest import read_manifest, verify_outputs
from pipeline.engine.schema_errors import suggest

# Bump when the meaning of a stage's outputs changes for the same config.
FINGERPRINT_VERSION = 1

_RESCAN: ContextVar[bool] = ContextVar("rescan", default=False)


@contextmanager
def rescan(enabled: bool = True) -> Iterator[None]:
    """Within it, data signatures stat every input file rather than trust cached listings of
    unchanged directories (`--rescan`), so a file rewritten in place is seen."""
    token = _RESCAN.set(enabled or _RESCAN.get())
    try:
        yield
    finally:
        _RESCAN.reset(token)


def rescanning() -> bool:
    """Whether a data signature computed now must stat every input file (see `rescan`)."""
    return _RESCAN.get()


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """Hash of each stage's kind, resolved config, launch shape, seed and upstream fingerprints.

    A training stage that resumes across world sizes hashes its global batch, not the ranks,
    micro batch and accumulation that make it: 2 ranks x 8 and 1 rank x 16 are one stage.
    """
    result: dict[str, str] = {}
    for name in topo_order(recipe):
        cfg = recipe.stages[name]
        launch = recipe.launch_for(name)
        unhashed = {"after", "launch", "slurm", "seed", *_unhashed(cfg)}
        config = cfg.model_dump(mode="json", exclude=unhashed)
        payload = {
            "version": FINGERPRINT_VERSION,
            "kind": cfg.kind,
            "config": config,
            "data": cfg.data_signature(),
            **_batch_shape(cfg, config, launch.nproc * launch.nnodes),
            "launch": launch.model_dump(exclude={"nproc", "nnodes"}) if cfg.distributed else {},
            "seed": recipe.seed if cfg.seed is None else cfg.seed,
            "upstream": {dep: result[dep] for dep in sorted(cfg.after)},
        }
        if external := external_signatures(recipe, name):  # model or tokenizer directories
            payload["external"] = external
        if from_recipe := cfg.recipe_signature(recipe):  # other stages' settings it reads
            payload["recipe"] = from_recipe
        if cfg.distributed and launch.deepspeed_config:
            payload["deepspeed_config"] = Path(launch.deepspeed_config).read_text(errors="replace")
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        result[name] = hashlib.sha256(blob).hexdigest()[:16]
    return result


def _unhashed(cfg: StageConfig) -> set[str]:
    """Fields that change how a stage runs, not what it computes (marked
    `json_schema_extra={"fingerprint": False}`): switching them keeps the stage and its
    checkpoints; and fields added after runs existed (`{"fingerprint": "when_set"}`) while they
    hold their default, so those runs keep their fingerprints."""
    unhashed = set()
    for name, field in type(cfg).model_fields.items():
        mark = field.json_schema_extra.get("fingerprint") if isinstance(
            field.json_schema_extra, dict) else None  # fmt: skip
        if mark is False or (mark == "when_set" and getattr(cfg, name) == field.default):
            unhashed.add(name)
    return unhashed


def _batch_shape(cfg: StageConfig, config: dict[str, Any], world_size: int) -> dict[str, int]:
    """The world-size part of a fingerprint: the global batch for a stage whose checkpoints
    resume on any number of ranks (`elastic_resume`: its batches depend on the step and the
    global batch only), taking its factors out of `config`; the world size for every other."""
    if not getattr(cfg, "elastic_resume", False):
        return {"world_size": world_size}
    micro, accum = config.pop("micro_batch_size"), config.pop("grad_accum_steps")
    return {"global_batch": world_size * micro * accum}


@dataclass(frozen=True)
class Step:
    """One stage in a plan: whether it runs, and the reason shown to the user."""

    name: str
    kind: str
    run: bool
    reason: str
    fingerprint: str


def stage_state(run_dir: Path, name: str, fingerprint: str) -> tuple[bool, str]:
    """(up to date?, reason) from the stage's manifest and outputs."""
    manifest = read_manifest(run_dir / name)
    if not manifest.get("status"):
        return False, "never run"
    status = manifest.get("status")
    if status != "done":
        return False, f"last attempt {status}" + (
            " (will resume)" if status in {"running", "failed", "preempted"} else ""
        )
    if manifest.get("fingerprint") != fingerprint:
        return False, "config or upstream changed"
    problem = verify_outputs(run_dir / name, manifest.get("outputs", {}))
    if problem:
        return False, problem
    return True, "up to date"


def plan(
    recipe: Recipe,
    *,
    from_stage: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> list[Step]:
    """Decide, in order, which stages run; `--from` and `--only` force their stages to rerun.

    A plan that runs a stage is made again under `rescan()`: the fingerprint a stage records
    then comes from fresh stats of its input files, never from a cached listing.
    """
    steps = _plan(recipe, from_stage, only, force)
    if rescanning() or not any(step.run for step in steps):
        return steps
    with rescan():
        return _plan(recipe, from_stage, only, force)


def _plan(
    recipe: Recipe, from_stage: str | None, only: list[str] | None, force: bool
) -> list[Step]:
    """One pass of `plan` with the data signatures as `rescanning()` says."""
    for flag, stages in (("--from", [from_stage] if from_stage else []), ("--only", only or [])):
        for stage in stages:
            if stage not in recipe.stages:
                raise RecipeError(
                    f"{flag} {stage}: no such stage{suggest(stage, recipe.stages)} "
                    f"(stages: {', '.join(recipe.stages)})"
                )
    run_dir = recipe.resolved_run_dir()
    prints = fingerprints(recipe)
    forced = Graph(recipe).downstream({from_stage}) if from_stage else set()
    steps: list[Step] = []
    rerun: set[str] = set()
    for name in topo_order(recipe):
        cfg = recipe.stages[name]
        fresh, reason = stage_state(run_dir, name, prints[name])
        if only is not None and name not in only:
            steps.append(Step(name, cfg.kind, False, f"not selected ({reason})", prints[name]))
            continue
        if only is not None:
            for dep in cfg.after:
                dep_fresh, dep_reason = stage_state(run_dir, dep, prints[dep])
                if not dep_fresh and dep not in only:
                    raise RecipeError(
                        f"--only {name}: upstream stage {dep!r} is not up to date ({dep_reason}); "
                        f"run it too (--only {dep},{name}) or use --from {dep}"
                    )
            run, why = True, "selected with --only" if fresh else reason
        elif force:
            run, why = True, "--force"
        elif name in forced:
            run, why = True, f"--from {from_stage}" if fresh else reason
        elif any(dep in rerun for dep in cfg.after):
            run, why = True, "upstream reruns"
        else:
            run, why = not fresh, reason
        if run:
            rerun.add(name)
        steps.append(Step(name, cfg.kind, run, why, prints[name]))
    return steps
