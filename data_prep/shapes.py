"""`builtin:shapes`: captioned scenes of coloured shapes, the data and the ground truth for
text-to-image diffusion, with a compositional held-out split.

- A scene holds 1 to 4 flat objects: a circle, a square or an upward triangle (base and height
  both 2 x radius), in one of six colours at corners of the RGB cube (red, green, blue, yellow,
  magenta, cyan: hues 60 degrees apart, so an analytic detector tells them apart after
  resizing), small or large, on a black background. Objects never touch (data_prep/
  shapes_layout.py keeps their boxes apart), so the ground truth is recoverable from pixels.
- Positions and radii are fractions of the image side, y downward (image convention; "above"
  means a smaller y), so a scene renders at any size.
- Six GenEval-like categories (CATEGORIES), one caption template each:
  single "a small red circle"; two_objects "a red circle and a red square" (shapes differ);
  counting "three green triangles" (1 to 4 alike); colours "a red square and a blue square";
  position "a red circle left of a blue square" (relation between centres, with a clear gap);
  attribute_binding "a red circle and a blue square" (shapes and colours both differ). Only
  `single` names a size.
- Scene i of a split is a pure function of (seed, split, i): its numpy Generator is seeded from
  SHA-256 of the three, never from Python's hash(). `train` cycles through the categories;
  `test` gives each category a scene of seen combinations (`unseen=False`) then one holding at
  least one held-out combination (`unseen=True`; its other objects may be any combination),
  in turn.
- HELD_OUT: 3 of the 18 (shape, colour) combinations, one per shape with distinct colours, taken
  in the order of SHA-256 of "shape/colour": cyan circle, green square, blue triangle. Fixed,
  independent of the seed; `train` never shows them (each shape and each colour still appears
  there), so `unseen` test scenes measure compositional generalisation.
- `render` draws at 4x with PIL and box-filters down: edge pixels carry their area coverage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from data_prep.shapes_layout import place
from pipeline.engine.errors import PipelineError

SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOURS = tuple(PALETTE)
SIZE_RADIUS = {"small": 0.11, "large": 0.18}  # half the box side, fraction of the image side
BACKGROUND = (0, 0, 0)
CATEGORIES = ("single", "two_objects", "counting", "colours", "position", "attribute_binding")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
MAX_COUNT = len(NUMBERS)
SPLITS = ("train", "test")
SUPERSAMPLE = 4  # render at 4x, then box-filter: anti-aliased edges
MIN_SIZE = 16

Combo = tuple[str, str]  # (shape, colour)
T = TypeVar("T")


def _held_out() -> frozenset[Combo]:
    """One combination per shape, colours distinct, first in SHA-256 order of "shape/colour"."""
    combos = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    combos.sort(key=lambda c: hashlib.sha256(f"{c[0]}/{c[1]}".encode()).hexdigest())
    chosen: list[Combo] = []
    for shape, colour in combos:
        if all(shape != s and colour != c for s, c in chosen):
            chosen.append((shape, colour))
    return frozenset(chosen)


HELD_OUT = _held_out()
SEEN = tuple((s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT)
ALL_COMBOS = tuple((s, c) for s in SHAPES for c in COLOURS)


@dataclass(frozen=True)
class ShapeObject:
    """One object; x, y (its centre) and radius are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float

    @property
    def combo(self) -> Combo:
        return self.shape, self.colour


@dataclass(frozen=True)
class Scene:
    """A caption and its ground truth. For `position`, objects[0] stands in `relation` to
    objects[1]; otherwise objects are in caption order (counting: all alike)."""

    category: str
    caption: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None
    unseen: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one line of the ground-truth JSONL)."""
        data = asdict(self)
        data["objects"] = [asdict(o) for o in self.objects]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """The scene `to_json` wrote."""
        objects = tuple(ShapeObject(**o) for o in data["objects"])
        return cls(
            category=data["category"],
            caption=data["caption"],
            objects=objects,
            relation=data.get("relation"),
            unseen=bool(data.get("unseen", False)),
        )


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _partner(category: str, first: Combo, pool: Sequence[Combo]) -> list[Combo]:
    """The combinations that may stand beside `first` in a two-object category."""
    shape, colour = first
    rules = {
        "two_objects": lambda s, c: s != shape,
        "colours": lambda s, c: s == shape and c != colour,
        "position": lambda s, c: (s, c) != first,
        "attribute_binding": lambda s, c: s != shape and c != colour,
    }
    return [combo for combo in pool if rules[category](*combo)]


def _combos(
    category: str, rng: np.random.Generator, first_pool: Sequence[Combo], pool: Sequence[Combo]
) -> list[Combo]:
    """The scene's (shape, colour) list: the first from `first_pool`, any others from `pool`."""
    first = _pick(rng, first_pool)
    if category == "single":
        return [first]
    if category == "counting":
        return [first] * int(rng.integers(1, MAX_COUNT + 1))
    pair = [first, _pick(rng, _partner(category, first, pool))]
    return pair if rng.random() < 0.5 else pair[::-1]  # the held-out one is not always first


def _name(obj: ShapeObject, with_size: bool = False) -> str:
    return f"a {obj.size + ' ' if with_size else ''}{obj.colour} {obj.shape}"


def caption(category: str, objects: Sequence[ShapeObject], relation: str | None = None) -> str:
    """The category's caption template filled with these objects."""
    if category == "single":
        return _name(objects[0], with_size=True)
    if category == "counting":
        first = objects[0]
        noun = first.shape + ("s" if len(objects) > 1 else "")
        return f"{NUMBERS[len(objects) - 1]} {first.colour} {noun}"
    if category == "position":
        return f"{_name(objects[0])} {relation} {_name(objects[1])}"
    return f"{_name(objects[0])} and {_name(objects[1])}"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"builtin:shapes/{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def scene(split: str, index: int, seed: int = 0) -> Scene:
    """Scene `index` of a split: a pure function of (seed, split, index)."""
    if split not in SPLITS:
        raise PipelineError(f"shapes split {split!r}: unknown; use one of {', '.join(SPLITS)}")
    rng = _rng(seed, split, index)
    if split == "train":
        category, unseen = CATEGORIES[index % len(CATEGORIES)], False
    else:
        category, unseen = CATEGORIES[(index // 2) % len(CATEGORIES)], index % 2 == 1
    first_pool = sorted(HELD_OUT) if unseen else SEEN
    combos = _combos(category, rng, first_pool, ALL_COMBOS if unseen else SEEN)
    sizes = [_pick(rng, tuple(SIZE_RADIUS)) for _ in combos]
    relation = _pick(rng, RELATIONS) if category == "position" else None
    radii = [SIZE_RADIUS[size] for size in sizes]
    centres = place(radii, rng, relation)
    objects = tuple(
        ShapeObject(shape, colour, size, round(x, 6), round(y, 6), radius)
        for (shape, colour), size, radius, (x, y) in zip(combos, sizes, radii, centres, strict=True)
    )
    return Scene(category, caption(category, objects, relation), objects, relation, unseen)


def scenes(split: str, count: int, seed: int = 0) -> Iterator[Scene]:
    """The first `count` scenes of a split ("train" or "test")."""
    for index in range(count):
        yield scene(split, index, seed)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB image (anti-aliased by 4x supersampling)."""
    if size < MIN_SIZE:
        raise PipelineError(f"shapes image size {size}: too small; use at least {MIN_SIZE}")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        centre = (obj.x * big, obj.y * big)
        draw_shape(draw, obj.shape, centre, obj.radius * big, PALETTE[obj.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill: Any
) -> None:
    """One shape filling the box [x - r, x + r) x [y - r, y + r) of canvas pixels (the
    detector draws its templates with it, so both agree on the geometry)."""
    # Pixel i covers [i, i + 1): the box's last pixel column is x + r - 1.
    x, y = centre
    left, top, right, bottom = x - radius, y - radius, x + radius - 1, y + radius - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([(x - 0.5, top), (right, bottom), (left, bottom)], fill=fill)
