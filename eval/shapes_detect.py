"""An analytic detector for `builtin:shapes` images (data_prep/shapes.py): which coloured shapes
an image shows, where, and how big. No learned model, so its errors are the image's, not a
second network's.

Steps, each chosen to tolerate the noise of generated images:
1. Colour: a pixel takes the palette colour nearest in hue (largest cosine between RGB vectors,
   so a dim anti-aliased edge keeps its colour). It is background when its saturation
   ((max - min) / max) is under MIN_SATURATION (greys, white, pastels) or when its coverage,
   the projection onto that colour (1 = fully painted), is under MIN_COVERAGE.
2. Objects: 8-connected components per colour (scipy.ndimage.label), grown by one pixel of
   background so faint edges count; the patch holds each pixel's coverage. A patch painting
   less than MIN_AREA of the image is noise and dropped.
3. Shape: template matching. Each of the three shapes is drawn by the renderer's own
   `draw_shape`, its radius fixed by the patch's area (area = pi r^2, 4 r^2, 2 r^2) and placed
   by its centroid (a triangle's lies r/3 below its box centre); the shape whose template
   differs least from the patch (squared error / template energy, the "misfit") wins, a best
   misfit over MAX_MISFIT makes a shapeless blob (shape None). Zero-mean pixel noise adds the
   same error to every template, which is why this beats box-fill ratios under noise. Size
   compares the fitted radius with the geometric mean of the two rendered radii; the centre,
   width and height are the fitted box's.

Accuracy on rendered `test` scenes, the fraction that `eval.shapes_score.score` judges correct
against their own caption; seeds 0, 1, 2 x 1200 scenes = 600 per category per size, half of
them unseen combinations (`.venv/bin/python -m eval.shapes_score --seeds 0 1 2`):
    64x64: 100.0% in every category, seen and unseen (3600/3600)
    32x32: 100.0% in every category, seen and unseen (3600/3600)
    16x16 (below the supported range): 91-100% per category, 97% mean
With Gaussian pixel noise (`--noise 30` / `--noise 45`, std on the 0-255 scale, `--count 600
--seeds 5`): std 30 100% at both sizes; std 45 100% at 64x64, 99.5% at 32x32 (three of 600
wrong). A Gaussian blur of std 1 pixel (PIL GaussianBlur(1.0), 300 scenes) keeps 64x64 at 100%
but drops 32x32 to about 80%: blurred small squares read as circles.
Clean renders fit with misfit under 0.06 at 32x32; noise blobs fit at 0.4-0.9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data_prep.shapes import PALETTE, SIZE_RADIUS, SUPERSAMPLE, draw_shape
from pipeline.engine.errors import PipelineError

MIN_SATURATION = 0.5  # (max - min) / max of a pixel's RGB: greys and pastels are background
MIN_COVERAGE = 0.45  # a pixel at least this painted starts an object
MIN_AREA = 0.006  # fraction of the image; the smallest rendered object (triangle) is 0.024
MAX_MISFIT = 0.5  # a worse best fit is a blob, not a shape (clean renders: under 0.05)
PAD = 2  # pixels of margin around a component's box for its templates
UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area / radius^2
SIZE_SPLIT = math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"])  # radius, fraction of side

COLOUR_NAMES = tuple(PALETTE)
_COLOURS = np.array([PALETTE[name] for name in COLOUR_NAMES], dtype=np.float32)  # [K, 3]
_DIRECTIONS = _COLOURS / np.linalg.norm(_COLOURS, axis=1, keepdims=True)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    """One object found; x, y (box centre), width, height, area are fractions of the image."""

    shape: str | None
    colour: str
    size: str
    x: float
    y: float
    width: float
    height: float
    area: float
    misfit: float

    @property
    def combo(self) -> tuple[str | None, str]:
        return self.shape, self.colour


def as_rgb(image: Any) -> np.ndarray:
    """A float32 [H, W, 3] array in 0..255 from a PIL image or a uint8 array [H, W, 3] or
    [3, H, W] (channel-first when the first axis is 3 and the last is not)."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise PipelineError(
            f"shapes image of shape {array.shape}: expected RGB [H, W, 3] or [3, H, W]; "
            "convert grey or RGBA images to RGB first"
        )
    return array.astype(np.float32)


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """Per pixel of [H, W, 3]: its palette index, or -1 for background."""
    norms = np.linalg.norm(rgb, axis=-1, keepdims=True)  # [H, W, 1]
    best = (rgb @ _DIRECTIONS.T / np.maximum(norms, 1e-6)).argmax(axis=-1)  # nearest hue
    brightest = rgb.max(axis=-1)
    saturation = (brightest - rgb.min(axis=-1)) / np.maximum(brightest, 1e-6)
    paint = _COLOURS[best]  # [H, W, 3]
    coverage = (rgb * paint).sum(-1) / (paint * paint).sum(-1)
    painted = (saturation >= MIN_SATURATION) & (coverage >= MIN_COVERAGE)
    return np.where(painted, best, -1)


def _coverage(rgb: np.ndarray, colour: int) -> np.ndarray:
    """How much of each pixel [h, w, 3] is painted in this palette colour (0..1)."""
    paint = _COLOURS[colour]
    return np.clip(rgb @ paint / float(paint @ paint), 0.0, 1.0)


def _template(
    shape: str, centre: tuple[float, float], radius: float, hw: tuple[int, int]
) -> np.ndarray:
    """Coverage [h, w] of one shape drawn as the renderer draws it (window pixel units)."""
    height, width = hw
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    big = (centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE)
    draw_shape(ImageDraw.Draw(canvas), shape, big, radius * SUPERSAMPLE, 255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _fit(patch: np.ndarray) -> tuple[str, float, tuple[float, float], float]:
    """The shape whose template (sized by the patch's area, placed by its centroid) differs
    least from the coverage patch [h, w]: (shape, radius, box centre, relative misfit)."""
    area = float(patch.sum())
    ys, xs = np.indices(patch.shape) + 0.5
    cx, cy = float((patch * xs).sum() / area), float((patch * ys).sum() / area)
    fits = []
    for shape, unit_area in UNIT_AREA.items():
        radius = math.sqrt(area / unit_area)
        centre = (cx, cy - radius / 3 if shape == "triangle" else cy)  # triangle: mass sits low
        template = _template(shape, centre, radius, patch.shape)
        misfit = float(((patch - template) ** 2).sum() / max((template**2).sum(), 1e-6))
        fits.append((misfit, shape, radius, centre))
    misfit, shape, radius, centre = min(fits)
    return shape, radius, centre, misfit


def _objects_of(colour: int, labels: np.ndarray, rgb: np.ndarray) -> list[Detection]:
    """The objects of one palette colour."""
    side = labels.shape[0]
    components, _ = ndimage.label(labels == colour, structure=_EIGHT)
    found = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        rows, cols = box
        top, left = max(rows.start - PAD, 0), max(cols.start - PAD, 0)
        window = (slice(top, rows.stop + PAD), slice(left, cols.stop + PAD))
        core = components[window] == index
        grown = ndimage.binary_dilation(core, structure=_EIGHT) & (core | (labels[window] == -1))
        patch = np.where(grown, _coverage(rgb[window], colour), 0.0)
        if patch.sum() < MIN_AREA * side * side:
            continue
        shape, radius, (x, y), misfit = _fit(patch)
        found.append(
            Detection(
                shape=shape if misfit <= MAX_MISFIT else None,
                colour=COLOUR_NAMES[colour],
                size="large" if radius / side >= SIZE_SPLIT else "small",
                x=(left + x) / side,
                y=(top + y) / side,
                width=2 * radius / side,
                height=2 * radius / side,
                area=float(patch.sum()) / side / side,
                misfit=misfit,
            )
        )
    return found


def detect(image: Any) -> list[Detection]:
    """The coloured shapes in an RGB image (PIL, or uint8 [H, W, 3] / [3, H, W]), by colour
    then top-to-bottom. Images are assumed square; x and y are fractions of the side."""
    rgb = as_rgb(image)
    if rgb.shape[0] != rgb.shape[1]:
        raise PipelineError(f"shapes image of shape {rgb.shape}: expected a square image")
    labels = classify_pixels(rgb)
    found: list[Detection] = []
    for colour in range(len(COLOUR_NAMES)):
        found += _objects_of(colour, labels, rgb)
    return found
