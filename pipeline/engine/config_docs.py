"""Field documentation of stage configs, as `pipeline show KIND` prints it: dotted names for
nested blocks, types, defaults and descriptions, read from the pydantic models."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel


class FieldDoc(typing.NamedTuple):
    """One config field as `pipeline show` prints it: dotted name, type, default, description."""

    name: str
    type: str
    default: str
    description: str


def describe_config(model: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every field of `model`, nested config blocks included under dotted names (`optim.lr`)."""
    docs = []
    for name, field in model.model_fields.items():
        nested = _single_model(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "required" if field.is_required() else _format_default(default)
        if nested is not None and isinstance(default, BaseModel):
            shown = "(below)"
        description = field.description or (nested.__doc__ if nested else None) or "-"
        description = " ".join(description.split())
        docs.append(FieldDoc(f"{prefix}{name}", _format_type(field.annotation), shown, description))
        if nested is not None:
            docs += describe_config(nested, prefix=f"{prefix}{name}.")
    return docs


def _single_model(annotation: Any) -> type[BaseModel] | None:
    """The one config class inside `annotation` (through Optional and lists), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for arg in typing.get_args(annotation) if (m := _single_model(arg)) is not None}
    return found.pop() if len(found) == 1 and typing.get_origin(annotation) is not dict else None


def _format_type(annotation: Any) -> str:
    """A type as a recipe author reads it: `int | None`, `'auto' | 'fp32'`, `list[str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_format_type(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_format_type(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _format_default(value: Any) -> str:
    """A default on one line as JSON (null, true, 0.001, ["a"]); plain strings as they are."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and value.isprintable() and value.strip() == value != "":
        return value
    return json.dumps(value, default=str)
