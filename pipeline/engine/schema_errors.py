"""Validation errors as one line each: the key path, the bad value, what is allowed, and a
close-match suggestion for a misspelt key."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


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
            current = unwrap(field.annotation)
        elif part.isdigit() or current is dict:
            continue
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


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
