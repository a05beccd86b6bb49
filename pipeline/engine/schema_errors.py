"""Validation errors as one line each: the key path, the bad value, what is allowed, and a
close-match suggestion for a misspelt key; and the checked string types whose errors say what to
write instead."""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError


def format_errors(
    exc: ValidationError, model: type[BaseModel], prefix: tuple[str, ...]
) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        path = ".".join((*prefix, *loc))
        if err["type"] == "extra_forbidden":
            parent = model_at(model, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = suggest(loc[-1], allowed)
            lines.append(f"{path}: unknown key{hint} (allowed: {', '.join(allowed)})")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
            # A check across keys (a model validator): its message names them and the fix.
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) else "a mapping"
            lines.append(f"{path}: got {shown}: {err['msg']}")
    return lines


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after", "function-before"})


def suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The config class that owns the key at `loc` (to list allowed keys and suggest one)."""
    current: Any = model
    for part in loc:
        if part.isdigit():  # an index into a list of models
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = tagged_members(field.annotation) or unwrap(field.annotation)
        elif isinstance(current, dict):  # a tagged union: pydantic's error names the tag
            current = current.get(part)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def tagged_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """The models of a union tagged by a `name` literal (task families), by tag; None if none."""
    found: dict[str, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "name" in arg.model_fields:
            found[str(arg.model_fields["name"].default)] = arg
        elif typing.get_args(arg):
            found |= tagged_members(arg) or {}
    return found if len(found) > 1 else None


def unwrap(annotation: Any) -> Any:
    """Strip Optional/list/dict wrappers down to the first BaseModel class, if any."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    for arg in typing.get_args(annotation):
        if arg is type(None):
            continue
        inner = unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation if origin not in (types.UnionType, typing.Union) else None


def matching(pattern: str, problem: str) -> AfterValidator:
    """A check that a string matches `pattern` in full, else fails with `problem` (what to write)."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(problem)
        return value

    return AfterValidator(check)


# Values rendered into sbatch files and paths: no shell syntax, no line breaks (see slurm.render).
SlurmName = Annotated[str, matching(r"[\w.,+:=@-]+", "use letters, digits and _.,+:=@- only")]
SlurmMem = Annotated[str, matching(r"\d+[KMGT]?", "use a number with K, M, G or T, e.g. 64G")]
SlurmTime = Annotated[
    str,
    matching(
        r"\d+(:\d\d){0,2}|\d+-\d+(:\d\d){0,2}|UNLIMITED|INFINITE",
        "use MINUTES, HH:MM:SS or DAYS-HH:MM:SS (e.g. 04:00:00)",
    ),
]
SbatchOption = Annotated[
    str,
    matching(
        r"(#SBATCH\s+)?--?\w[^\x00-\x1f\x7f]*",
        "one sbatch option on one line, e.g. --constraint=a100",
    ),
]
PathText = Annotated[str, matching(r"[^\x00-\x1f\x7f]+", "a path without control characters")]
