"""Where a shapes scene's objects go: rejection sampling of centres so that no two objects touch
and a stated relation between the first two is unambiguous.

Every shape fits the square box of half-side `radius` around its centre, so keeping boxes apart
keeps the shapes apart. Coordinates are fractions of the image side, y downward (image
convention), so a layout renders at any size. Pure functions of the radii, the relation and the
numpy Generator handed in: the caller's seeded Generator makes the layout deterministic.
"""

from __future__ import annotations

import numpy as np

EDGE = 0.03  # an object's box keeps this far from the image border
GAP = 0.08  # boxes keep this far apart (2.5 pixels at 32x32), so components never merge
OFF_AXIS = 0.5  # a relation's off-axis offset is at most this fraction of its on-axis offset
TRIES_PER_OBJECT = 60
LAYOUTS = 400

Centre = tuple[float, float]


def relation_offsets(relation: str, first: Centre, second: Centre) -> tuple[float, float]:
    """(on-axis, off-axis) offset of `first` from `second` for "first <relation> second"; the
    on-axis offset is positive when the relation holds (y grows downward)."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    on_axis = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    off_axis = dy if relation in ("left of", "right of") else dx
    return on_axis, off_axis


def _apart(a: Centre, radius_a: float, b: Centre, radius_b: float) -> bool:
    """The two boxes are at least GAP apart along some axis."""
    reach = radius_a + radius_b + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _clear(relation: str, first: Centre, r_first: float, second: Centre, r_second: float) -> bool:
    """The boxes do not overlap along the relation's axis, and the offset points along it."""
    on_axis, off_axis = relation_offsets(relation, first, second)
    return on_axis >= r_first + r_second + GAP and abs(off_axis) <= OFF_AXIS * on_axis


def _try_layout(radii: list[float], rng: np.random.Generator, relation: str | None) -> list[Centre]:
    """One attempt: each object in turn gets a free spot, or the attempt gives up (empty list)."""
    centres: list[Centre] = []
    for index, radius in enumerate(radii):
        for _ in range(TRIES_PER_OBJECT):
            x, y = rng.uniform(radius + EDGE, 1 - radius - EDGE, size=2)
            centre = (float(x), float(y))
            fits = all(_apart(centre, radius, c, radii[i]) for i, c in enumerate(centres))
            if fits and relation is not None and index == 1:
                fits = _clear(relation, centres[0], radii[0], centre, radius)
            if fits:
                centres.append(centre)
                break
        else:
            return []
    return centres


def place(
    radii: list[float], rng: np.random.Generator, relation: str | None = None
) -> list[Centre]:
    """Centres for objects of these radii, apart from each other; with a relation, the first
    object stands in it to the second ("first left of second")."""
    for _ in range(LAYOUTS):
        centres = _try_layout(radii, rng, relation)
        if centres:
            return centres
    raise RuntimeError(f"no layout found for radii {radii} (relation {relation})")
