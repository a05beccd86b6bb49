"""Sweeps: a stage with `sweep: {key: [values], ...}` becomes one stage per zipped point."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel

from pipeline.engine.errors import RecipeError
from pipeline.engine.schema_errors import suggest, unwrap

_SLUG = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def expand_sweeps(
    stages: dict[str, Any], kinds: dict[str, type[BaseModel]], source: str = "recipe"
) -> dict[str, Any]:
    """Replace each stage with a `sweep:` by one stage per point; `after:` lists follow.

    `sweep: {model.hidden_size: [64, 128], model.num_layers: [2, 4]}` zips equal-length lists
    (keys dotted or nested) into `NAME.hidden_size-64_num_layers-2`, ... (`NAME.0`... if long).
    """
    expanded: dict[str, Any] = {}
    renamed: dict[str, list[str]] = {}
    for name, raw in stages.items():
        if not isinstance(raw, dict) or "sweep" not in raw:
            expanded[name] = dict(raw) if isinstance(raw, dict) else raw
            continue
        points = _sweep_points(f"{source}: stages.{name}", raw, kinds)
        slugs = ["_".join(f"{path[-1]}-{value}" for path, value in p.items()) for p in points]
        readable = len(set(slugs)) == len(slugs) and all(_SLUG.fullmatch(s) for s in slugs)
        renamed[name] = [f"{name}.{slug if readable else i}" for i, slug in enumerate(slugs)]
        for new_name, point in zip(renamed[name], points, strict=True):
            if new_name in stages:
                raise RecipeError(f"{source}: stages.{name}.sweep: {new_name!r} is already a stage")
            expanded[new_name] = stage = {k: v for k, v in raw.items() if k != "sweep"}
            for path, value in point.items():
                node = stage
                for part in path[:-1]:  # copy each block on the path: expansions share nothing
                    node[part] = node = dict(b) if isinstance(b := node.get(part), dict) else {}
                node[path[-1]] = value
    for raw in expanded.values():
        if isinstance(raw, dict) and isinstance(raw.get("after"), list):
            raw["after"] = [new for dep in raw["after"] for new in renamed.get(dep, [dep])]
    return expanded


def _sweep_points(
    where: str, raw: dict[str, Any], kinds: dict[str, type[BaseModel]]
) -> list[dict[tuple[str, ...], Any]]:
    """The zipped values of a stage's sweep, one {key path: value} per expansion."""
    kind, sweep = raw.get("kind"), raw["sweep"]
    if kind not in kinds:
        raise RecipeError(f"{where}.kind: {kind!r} is not a stage kind{suggest(str(kind), kinds)}")
    if not isinstance(sweep, dict) or not sweep:
        raise RecipeError(f"{where}.sweep: expected {{key: [values]}}, got {sweep!r}")
    lists: dict[tuple[str, ...], list[Any]] = {}
    pending: list[tuple[tuple[str, ...], dict[str, Any]]] = [((), sweep)]
    while pending:
        prefix, block = pending.pop(0)
        for key, value in block.items():
            path = (*prefix, *str(key).split("."))
            if isinstance(value, dict):
                pending.append((path, value))
                continue
            if not isinstance(value, list) or not value:
                got = f"{where}.sweep.{'.'.join(path)}: got {value!r}"
                raise RecipeError(f"{got}; expected a non-empty list of values")
            if problem := _sweep_key_problem(kinds[kind], path):
                raise RecipeError(f"{where}.sweep.{problem}")
            lists[path] = value
    first, *others = lists
    for path in others:
        if len(lists[path]) != len(lists[first]):
            raise RecipeError(
                f"{where}.sweep.{'.'.join(path)}: {len(lists[path])} values but "
                f"{'.'.join(first)} has {len(lists[first])}; zipped lists need equal lengths"
            )
    return [{path: values[i] for path, values in lists.items()} for i in range(len(lists[first]))]


def _sweep_key_problem(config: type[BaseModel], path: tuple[str, ...]) -> str | None:
    """Why `path` is not a key of a stage of class `config` (one line), or None if it is."""
    current: Any = config
    for i, part in enumerate(path):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            if current is Any or dict in (current, typing.get_origin(current)):
                return None  # a free-form mapping: its keys are checked by the stage
            return f"{'.'.join(path[:i])}: not a mapping, cannot set {'.'.join(path)}"
        if part not in current.model_fields:
            allowed = sorted(current.model_fields)
            hint = suggest(part, allowed)
            return f"{'.'.join(path[: i + 1])}: unknown key{hint} (allowed: {', '.join(allowed)})"
        annotation = current.model_fields[part].annotation
        current = unwrap(annotation) or next(
            (a for a in typing.get_args(annotation) if dict in (a, typing.get_origin(a))), None
        )
    return None
