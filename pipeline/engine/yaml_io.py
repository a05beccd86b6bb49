"""YAML as recipes need it: safe loading that refuses a key given twice in one mapping, and
recipe variables (`vars:`, used as `${name}`, set with `-o vars.name=VALUE`)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from pipeline.engine.errors import RecipeError

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice (YAML itself would keep the last one silently)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (first on line {first_line})")
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen and key != "<<":
                raise DuplicateKey(key, line, seen[key])
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def substitute_vars(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Replace `${name}` in every string of the recipe by its `vars:` value: a string that is
    only `${name}` takes the value as it is (a mapping, a number), else it is spliced in as text.
    A variable left null is required: one line says how to set it."""
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise RecipeError(f"{source}: vars: expected a mapping of name -> value")

    def value_of(name: str, where: str) -> Any:
        if name not in variables:
            known = ", ".join(variables) or "none"
            raise RecipeError(f"{source}: {where}: ${{{name}}} is not in vars (vars: {known})")
        if variables[name] is None:
            raise RecipeError(
                f"{source}: vars.{name} is required ({where} uses it); set it with "
                f"-o vars.{name}=VALUE"
            )
        return variables[name]

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}.{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and (whole := VARIABLE.fullmatch(node)):
            return value_of(whole.group(1), where)
        if isinstance(node, str):
            return VARIABLE.sub(lambda m: str(value_of(m.group(1), where)), node)
        return node

    return {k: (v if k == "vars" else walk(v, k)) for k, v in data.items()}
