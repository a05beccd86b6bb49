"""builtin:shapes: deterministic captioned scenes with a compositional held-out split, and the
analytic detector and GenEval-style scorer that judge images against their captions."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from data_prep.shapes import (
    CATEGORIES,
    COLOURS,
    HELD_OUT,
    NUMBERS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    caption,
    render,
    scenes,
)
from data_prep.shapes_layout import EDGE, GAP, relation_offsets
from eval.shapes_detect import detect
from eval.shapes_score import score, summarise
from eval.stats import wilson_interval
from pipeline.engine.errors import PipelineError

C, S = "|".join(COLOURS), "|".join(SHAPES)
NAME = rf"a ({C}) ({S})"
TEMPLATES = {
    "single": rf"a (small|large) ({C}) ({S})",
    "two_objects": rf"{NAME} and {NAME}",
    "counting": rf"(one ({C}) ({S})|({'|'.join(NUMBERS[1:])}) ({C}) ({S})s)",
    "colours": rf"{NAME} and {NAME}",
    "position": rf"{NAME} ({'|'.join(RELATIONS)}) {NAME}",
    "attribute_binding": rf"{NAME} and {NAME}",
}
DETECTOR_SCENES = 200  # per size; the detector's docstring states 100% on 3600 per size


def _json(items: list[Scene]) -> list[dict]:
    return [s.to_json() for s in items]


def _recaption(scene: Scene, **changes: object) -> Scene:
    """The scene with some fields changed and its caption rewritten to match."""
    changed = dataclasses.replace(scene, **changes)
    return dataclasses.replace(
        changed, caption=caption(changed.category, changed.objects, changed.relation)
    )


@pytest.fixture(scope="module")
def test_scenes() -> list[Scene]:
    return list(scenes("test", DETECTOR_SCENES, seed=3))


def test_scenes_are_a_pure_function_of_seed_split_and_index() -> None:
    first = _json(list(scenes("train", 60, seed=0)))
    assert first == _json(list(scenes("train", 60, seed=0)))
    assert _json(list(scenes("train", 30, seed=0))) == first[:30]  # count does not change them
    assert first != _json(list(scenes("train", 60, seed=1)))
    assert _json(list(scenes("test", 60, seed=0))) != first


def test_held_out_combinations_only_in_unseen_test_scenes() -> None:
    assert len(HELD_OUT) == 3
    assert {shape for shape, _ in HELD_OUT} == set(SHAPES)  # one per shape
    assert len({colour for _, colour in HELD_OUT}) == 3  # colours distinct
    train = list(scenes("train", 600))
    assert not any(o.combo in HELD_OUT for s in train for o in s.objects)
    assert not any(s.unseen for s in train)
    test = list(scenes("test", 600))
    unseen = [s for s in test if s.unseen]
    assert len(unseen) == 300
    assert all(any(o.combo in HELD_OUT for o in s.objects) for s in unseen)
    assert not any(o.combo in HELD_OUT for s in test if not s.unseen for o in s.objects)
    assert {s.category for s in unseen} == set(CATEGORIES)
    assert {o.combo for s in unseen for o in s.objects} >= HELD_OUT


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_follow_their_category_template_and_ground_truth(split: str) -> None:
    for scene in scenes(split, 300, seed=2):
        assert re.fullmatch(TEMPLATES[scene.category], scene.caption), scene.caption
        assert scene.caption == caption(scene.category, scene.objects, scene.relation)
        combos = [o.combo for o in scene.objects]
        first, *rest = combos
        if scene.category == "counting":
            assert 1 <= len(combos) <= 4 and set(combos) == {first}
        elif scene.category == "single":
            assert len(combos) == 1
        else:
            (second,) = rest
            rule = {
                "two_objects": first[0] != second[0],
                "colours": first[0] == second[0] and first[1] != second[1],
                "position": first != second,
                "attribute_binding": first[0] != second[0] and first[1] != second[1],
            }[scene.category]
            assert rule, scene.caption


def test_objects_lie_inside_the_image_apart_and_in_their_relation() -> None:
    for scene in scenes("test", 300, seed=4):
        objects = scene.objects
        for o in objects:
            assert min(o.x, o.y) - o.radius >= EDGE - 1e-5
            assert max(o.x, o.y) + o.radius <= 1 - EDGE + 1e-5
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                reach = a.radius + b.radius + GAP - 1e-5
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach
        if scene.category == "position":
            first, second = objects
            on_axis, off_axis = relation_offsets(
                scene.relation, (first.x, first.y), (second.x, second.y)
            )
            assert on_axis >= first.radius + second.radius + GAP - 1e-5
            assert abs(off_axis) <= 0.5 * on_axis + 1e-5


def test_scene_json_round_trip() -> None:
    for scene in scenes("test", 24, seed=5):
        line = json.dumps(scene.to_json())
        assert Scene.from_json(json.loads(line)) == scene


@pytest.mark.parametrize("size", [32, 64])
def test_detector_recovers_every_object_of_rendered_test_scenes(
    size: int, test_scenes: list[Scene]
) -> None:
    """The ground truth is in the pixels, and the detector reads it at its stated accuracy."""
    results = []
    for scene in test_scenes:
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        found = detect(image)
        assert len(found) == len(scene.objects), scene.caption
        for obj in scene.objects:
            nearest = min(found, key=lambda d: (d.x - obj.x) ** 2 + (d.y - obj.y) ** 2)
            assert (nearest.shape, nearest.colour, nearest.size) == (
                obj.shape,
                obj.colour,
                obj.size,
            )
            assert abs(nearest.x - obj.x) < 1 / size and abs(nearest.y - obj.y) < 1 / size
            assert abs(nearest.width - 2 * obj.radius) < 1.5 / size
        results.append(score(scene, image))
    summary = summarise(results)
    for category in CATEGORIES:
        for key in (category, category + "/unseen"):
            assert summary[key]["accuracy"] == 1.0 and summary[key]["count"] > 0, key
    assert summary["overall"]["accuracy"] == summary["overall/unseen"]["accuracy"] == 1.0


def test_channel_first_arrays_read_like_images(test_scenes: list[Scene]) -> None:
    scene = test_scenes[7]
    pixels = np.asarray(render(scene, 64))
    assert detect(pixels.transpose(2, 0, 1)) == detect(pixels) == detect(render(scene, 64))
    with pytest.raises(PipelineError, match="expected RGB"):
        detect(pixels[..., 0])


def _other_colour(colour: str, avoid: set[str]) -> str:
    return next(c for c in COLOURS if c != colour and c not in avoid)


def _wrong_captions(scene: Scene) -> list[Scene]:
    """Captions this scene's image must fail: a wrong colour, shape, count, relation or size."""
    first = scene.objects[0]
    taken = {o.colour for o in scene.objects}
    recolour = dataclasses.replace(first, colour=_other_colour(first.colour, taken))
    wrong = [_recaption(scene, objects=(recolour, *scene.objects[1:]))]
    if scene.category == "single":
        other_shape = next(s for s in SHAPES if s != first.shape)
        other_size = "large" if first.size == "small" else "small"
        wrong.append(_recaption(scene, objects=(dataclasses.replace(first, shape=other_shape),)))
        wrong.append(_recaption(scene, objects=(dataclasses.replace(first, size=other_size),)))
    if scene.category == "counting":
        more = (*scene.objects, first)
        wrong.append(_recaption(scene, objects=more if len(more) <= 4 else scene.objects[:-1]))
    if scene.category == "position":
        opposite = {"left of": "right of", "right of": "left of", "above": "below"}
        turned = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}
        for table in (opposite, turned):
            wrong.append(_recaption(scene, relation=table.get(scene.relation, "above")))
    if scene.category == "attribute_binding":
        a, b = scene.objects
        swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
        wrong.append(_recaption(scene, objects=swapped))
    return wrong


def test_scorer_fails_images_that_do_not_show_the_caption(test_scenes: list[Scene]) -> None:
    checked = 0
    for scene in test_scenes[:48]:
        image = render(scene, 32)
        assert score(scene, image)["correct"]
        for wrong in _wrong_captions(scene):
            result = score(wrong, image)
            assert not result["correct"], (scene.caption, wrong.caption, wrong.relation)
            checked += 1
    assert checked >= 80
    rng = np.random.default_rng(0)
    for size in (32, 64):
        for scene in test_scenes[:12]:
            noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            assert not score(scene, noise)["correct"]
        blank = score(test_scenes[0], np.zeros((size, size, 3), np.uint8))
        assert not blank["correct"] and blank["missing"] and not blank["extra"]


def test_an_unnamed_object_fails_the_scene() -> None:
    """Two scenes' objects on one image: the caption of either misses the other's objects."""
    red = ShapeObject("circle", "red", "small", 0.25, 0.25, 0.11)
    blue = ShapeObject("square", "blue", "large", 0.7, 0.7, 0.18)
    both = Scene("two_objects", "a red circle and a blue square", (red, blue))
    only_red = Scene("single", "a small red circle", (red,))
    result = score(only_red, render(both, 64))
    assert not result["correct"] and result["extra"] == ["blue square"]
    assert score(both, render(both, 64))["correct"]


def test_summary_reports_categories_unseen_apart_with_wilson_intervals() -> None:
    def outcome(category: str, unseen: bool, correct: bool) -> dict:
        return {"category": category, "unseen": unseen, "correct": correct}

    results = [outcome("position", False, i < 3) for i in range(4)]
    results += [outcome("position", True, i < 1) for i in range(2)]
    results += [outcome("counting", False, True) for _ in range(5)]
    summary = summarise(results)
    assert summary["position"]["accuracy"] == 0.75 and summary["position"]["count"] == 4
    assert (summary["position"]["low"], summary["position"]["high"]) == wilson_interval(3, 4)
    assert summary["position/unseen"]["accuracy"] == 0.5
    assert summary["overall"]["accuracy"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["overall/unseen"]["accuracy"] == 0.5
    assert "counting/unseen" not in summary
    for key, row in summary.items():
        if not key.startswith("overall"):
            assert row["low"] <= row["accuracy"] <= row["high"]


def test_user_errors_are_one_line() -> None:
    with pytest.raises(PipelineError, match="unknown"):
        next(scenes("validation", 1))
    with pytest.raises(PipelineError, match="too small"):
        render(next(scenes("test", 1)), 8)
