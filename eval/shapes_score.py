"""GenEval-style scoring of `builtin:shapes` images: is the image what its caption says?

`score(scene, image)` runs the analytic detector (eval/shapes_detect.py) and judges the image
against the scene's caption by its category's rule. Every rule also fails an image holding an
object the caption does not name (any detection above the detector's noise floor, including
shapeless blobs), since the training images never show one:
- single: the named shape in the named colour and size, once;
- two_objects, colours: both named objects present;
- counting: exactly N objects of the named shape and colour;
- position: both present, and the first stands in the relation to the second by GenEval's rule
  on box centres: each axis of the offset shrunk by POSITION_MARGIN of the two boxes' summed
  sides, the relation's direction must carry more than half the offset's length;
- attribute_binding: each colour on its named shape; a swap ("a blue circle and a red square"
  for "a red circle and a blue square") shows up as two missing and two extra objects.

`summarise(results)` gives per-category accuracy with a 95% Wilson interval, scenes of held-out
combinations apart under "<category>/unseen", and the mean over categories ("overall" and
"overall/unseen"). Running this module prints the detector's accuracy on rendered scenes.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from data_prep.shapes import CATEGORIES, Scene, render, scenes
from eval.shapes_detect import Detection, detect
from eval.stats import wilson_interval

POSITION_MARGIN = 0.1  # GenEval's position threshold
AXIS_SHARE = 0.5  # the shrunk offset along the axis, as a share of the offset's length


def relations(first: Detection, second: Detection) -> set[str]:
    """The relations in which `first` stands to `second` (GenEval's rule; y grows downward)."""
    offset = np.array([first.x - second.x, first.y - second.y])
    norm = float(np.linalg.norm(offset))
    sides = np.array([first.width + second.width, first.height + second.height])
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * sides, 0.0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    found = set()
    if dx < -AXIS_SHARE:
        found.add("left of")
    if dx > AXIS_SHARE:
        found.add("right of")
    if dy < -AXIS_SHARE:
        found.add("above")
    if dy > AXIS_SHARE:
        found.add("below")
    return found


def _relation_holds(scene: Scene, found: list[Detection]) -> bool:
    """Some detection of the first named object stands in the relation to one of the second."""
    first, second = scene.objects[0].combo, scene.objects[1].combo
    return any(
        scene.relation in relations(a, b)
        for a in found
        if a.combo == first
        for b in found
        if b.combo == second
    )


def judge(scene: Scene, found: list[Detection]) -> dict[str, Any]:
    """Whether these detections are what the scene's caption asks for (see the module doc)."""
    expected = Counter(obj.combo for obj in scene.objects)
    got: Counter[tuple[str | None, str]] = Counter(d.combo for d in found)
    missing, extra = expected - got, got - expected
    correct = not missing and not extra
    result: dict[str, Any] = {
        "category": scene.category,
        "caption": scene.caption,
        "unseen": scene.unseen,
        "missing": [f"{colour} {shape}" for (shape, colour) in missing.elements()],
        "extra": [f"{colour} {shape or 'blob'}" for (shape, colour) in extra.elements()],
    }
    if scene.category == "single":
        named = scene.objects[0]
        result["size_matches"] = any(d.combo == named.combo and d.size == named.size for d in found)
        correct = correct and result["size_matches"]
    if scene.category == "position":
        result["relation_holds"] = _relation_holds(scene, found)
        correct = correct and result["relation_holds"]
    result["correct"] = correct
    return result


def score(scene: Scene, image: Any) -> dict[str, Any]:
    """Judge an image (PIL, or uint8 [H, W, 3] / [3, H, W]) against the scene's caption."""
    return judge(scene, detect(image))


def _entry(outcomes: list[bool]) -> dict[str, float]:
    correct = sum(outcomes)
    low, high = wilson_interval(correct, len(outcomes))
    return {
        "accuracy": correct / max(len(outcomes), 1),
        "correct": correct,
        "count": len(outcomes),
        "low": low,
        "high": high,
    }


def summarise(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-category accuracy, count and 95% Wilson interval; held-out combinations under
    "<category>/unseen"; "overall" and "overall/unseen" average the categories present."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        suffix = "/unseen" if result["unseen"] else ""
        groups[result["category"] + suffix].append(bool(result["correct"]))
    summary: dict[str, dict[str, float]] = {}
    for suffix in ("", "/unseen"):
        keys = [c + suffix for c in CATEGORIES if c + suffix in groups]
        summary.update({key: _entry(groups[key]) for key in keys})
        if keys:
            accuracies = [summary[key]["accuracy"] for key in keys]
            summary["overall" + suffix] = {
                "accuracy": sum(accuracies) / len(accuracies),
                "categories": len(keys),
            }
    return summary


def detector_accuracy(
    size: int, count: int, seed: int = 0, noise: float = 0.0
) -> dict[str, dict[str, float]]:
    """The summary of rendered `test` scenes scored against their own captions, optionally with
    Gaussian pixel noise of std `noise` (0-255 scale) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    results = []
    for scene in scenes("test", count, seed):
        pixels = np.asarray(render(scene, size), dtype=np.float32)
        if noise:
            pixels = np.clip(pixels + rng.normal(0.0, noise, pixels.shape), 0, 255)
        results.append(score(scene, pixels.astype(np.uint8)))
    return summarise(results)


def main() -> None:
    """Print the detector's accuracy on rendered test scenes (the table in shapes_detect)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--count", type=int, default=1200, help="scenes per size and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--noise", type=float, default=0.0, help="pixel noise std, 0-255")
    args = parser.parse_args()
    for size in args.sizes:
        for seed in args.seeds:
            summary = detector_accuracy(size, args.count, seed, args.noise)
            cells = [f"{key} {row['accuracy']:.1%}" for key, row in summary.items()]
            print(f"size {size} seed {seed}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
