"""One object for the shape of a recipe's stage graph: order, upstream, downstream, nearest."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.engine.config import Recipe, topo_order


class Graph:
    """The stages of a recipe as a DAG over their `after:` lists (validated: no unknown names,
    no cycles)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.order: list[str] = topo_order(recipe)

    def after(self, name: str) -> list[str]:
        """The stages `name` lists in its `after:`."""
        return list(self.recipe.stages[name].after)

    def upstream(self, name: str) -> set[str]:
        """Every stage `name` depends on, directly or through other stages."""
        seen: set[str] = set()
        frontier = self.after(name)
        while frontier:
            stage = frontier.pop()
            if stage not in seen:
                seen.add(stage)
                frontier += self.after(stage)
        return seen

    def downstream(self, roots: set[str]) -> set[str]:
        """`roots` and every stage that depends on them, transitively."""
        result = set(roots)
        for name in self.order:
            if any(dep in result for dep in self.after(name)):
                result.add(name)
        return result

    def nearest(self, name: str, fits: Callable[[str], bool]) -> str | None:
        """The nearest upstream stage (breadth-first over `after`, in list order) that `fits`."""
        seen: set[str] = set()
        frontier = self.after(name)
        while frontier:
            following: list[str] = []
            for stage in frontier:
                if stage in seen:
                    continue
                seen.add(stage)
                if fits(stage):
                    return stage
                following += self.after(stage)
            frontier = following
        return None
