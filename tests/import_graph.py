"""Import graph of a source tree, read with `ast`, and its cycles (one per strongly connected part).

What counts as an edge from module M to module T (both inside the scanned packages):
- `import T` / `import T as x` anywhere in M, including inside functions, methods and `try`;
- `from T import name` where `name` is not a submodule of T (T may be a package `__init__`);
- `from P import T_last` where `P.T_last` is a module: the edge goes to that submodule;
- relative forms of both, resolved against M's package.
Not counted: imports under `if TYPE_CHECKING:` (they never execute at runtime), and the implicit
initialisation of parent packages that Python performs before a submodule (a package `__init__`
importing its own submodules is the normal pattern and does not deadlock).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file for every `.py` file under `root/<package>`."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is `TYPE_CHECKING` or `<module>.TYPE_CHECKING`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree` that can execute at runtime (skips TYPE_CHECKING bodies)."""
    if isinstance(tree, ast.Import | ast.ImportFrom):
        yield tree
        return
    if isinstance(tree, ast.If) and _is_type_checking(tree.test):
        for child in tree.orelse:
            yield from _runtime_imports(child)
        return
    for child in ast.iter_child_nodes(tree):
        yield from _runtime_imports(child)


def _base_module(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) `from ... import` statement names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*parts, node.module] if node.module else parts)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (see the module docstring for what counts)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree):
            graph[name].update(_resolve(name, is_package, node, modules))
    return graph


def _resolve(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]
) -> set[str]:
    """The project modules one import statement depends on: the most specific module it names."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        candidates = [[alias.name] for alias in node.names]
    else:
        base = _base_module(module, is_package, node)
        candidates = [[f"{base}.{alias.name}", base] for alias in node.names]
    for options in candidates:
        hit = next((option for option in options if option in modules), None)
        if hit is not None and hit != module:
            found.add(hit)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the first module of `component`, as [m0, m1, ..., m0] (shortest, by BFS)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise ValueError(f"{component} is not strongly connected")


def find_cycles(root: Path, packages: Iterable[str]) -> list[list[str]]:
    """One import cycle per strongly connected component of the packages under `root`."""
    graph = import_graph(find_modules(root, packages))
    return [cycle_in(graph, component) for component in strongly_connected(graph)]
