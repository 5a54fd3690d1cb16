"""checker.py: the exact checker scores 100% on renders and 0% on noise, each category's rule fails the
images it should, verdicts survive model-like perturbations and agree with the hand-checked generated
images; the protocol's seeds, scores, bootstrap intervals and over-counting rate by hand."""

import copy
import os

import numpy as np
import pytest
import torch

import shapes
from shapes import checker


def test_checker_scores_100_on_rendered_images():
    # Random specs over several seeds, both image formats the checker accepts.
    for seed in range(3):
        rng = np.random.default_rng(seed)
        specs = [shapes.random_spec(rng, c) for c in shapes.CATEGORIES for _ in range(50)]
        images = [shapes.render(s, 32, rng) for s in specs]
        assert checker.score(images, specs) == {**{c: 1.0 for c in shapes.CATEGORIES}, "mean": 1.0}
    tensors = shapes.to_tensor(np.stack(images[::10]))
    assert all(checker.check(t, s) for t, s in zip(tensors, specs[::10]))
    # A larger canvas: geometry and thresholds scale with size.
    rng = np.random.default_rng(7)
    for c in shapes.CATEGORIES:
        spec = shapes.random_spec(rng, c)
        assert checker.check(shapes.render(spec, 64, rng), spec), spec


def test_checker_scores_100_on_shipped_eval_set():
    items = shapes.load_eval_set()
    specs = [it["spec"] for it in items]
    images = [shapes.render(s, 32, i) for i, s in enumerate(specs)]
    result = checker.score(images, specs)
    assert result["mean"] == 1.0, result


def test_checker_rejects_gaussian_noise():
    items = shapes.load_eval_set()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(items), 3, 32, 32, generator=g).clamp(-1, 1)
    result = checker.score(noise, [it["spec"] for it in items])
    assert set(result) == set(shapes.CATEGORIES) | {"mean"}
    assert all(v <= 0.05 for v in result.values()), result


def test_detect_finds_the_rendered_objects():
    spec = {"category": "counting", "objects": [{"shape": "triangle", "color": "white"}], "count": 4}
    found = checker.detect(shapes.render(spec, 32, 3))
    assert len(found) == 4
    assert all(o["shape"] == "triangle" and o["color"] == "white" and o["area"] >= 12 for o in found)
    assert checker.detect(np.zeros((32, 32, 3), np.uint8)) == []


def paint(objects, size=32):
    """Hand-made image: objects are (shape, color, x, y, side) boxes on black."""
    image = np.zeros((size, size, 3), np.uint8)
    for shape, color, x, y, side in objects:
        image[y : y + side, x : x + side][shapes.shape_mask(shape, side)] = shapes.PALETTE[color]
    return image


def test_relations_mean_what_they_say():
    # Independent of the renderer: red square on the left and high, blue circle right and low.
    image = paint([("square", "red", 2, 2, 8), ("circle", "blue", 20, 20, 9)])
    red_square, blue_circle = {"shape": "square", "color": "red"}, {"shape": "circle", "color": "blue"}
    for relation, truth in [("left of", True), ("above", True), ("right of", False), ("below", False)]:
        spec = {"category": "position", "objects": [red_square, blue_circle], "relation": relation}
        assert checker.check(image, spec) == truth, relation


def test_extra_object_of_another_colour_fails_counting():
    # "two green squares" with a third, red, square in the picture: GenEval
    # counts the class, so there are three squares, not two.
    image = paint([("square", "green", 2, 2, 8), ("square", "green", 20, 2, 8), ("square", "red", 2, 20, 8)])
    spec = {"category": "counting", "objects": [{"shape": "square", "color": "green"}], "count": 2}
    assert not checker.check(image, spec)
    assert checker.check(image[:, :, :] * (image[:, :, 0:1] == 0), spec)  # red one removed


def test_wrong_colour_fails_colors():
    image = shapes.render({"category": "colors", "objects": [{"shape": "circle", "color": "red"}]}, 32, 0)
    assert checker.check(image, {"category": "colors", "objects": [{"shape": "circle", "color": "red"}]})
    assert not checker.check(image, {"category": "colors", "objects": [{"shape": "circle", "color": "blue"}]})
    assert not checker.check(image, {"category": "colors", "objects": [{"shape": "square", "color": "red"}]})
    # single_object only asks for the shape, so the colour does not matter there.
    assert checker.check(image, {"category": "single_object", "objects": [{"shape": "circle", "color": "blue"}]})


def test_wrong_count_fails_counting():
    obj = {"shape": "square", "color": "green"}
    for seed in range(10):
        image = shapes.render({"category": "counting", "objects": [obj], "count": 3}, 32, seed)
        assert checker.check(image, {"category": "counting", "objects": [obj], "count": 3})
        assert not checker.check(image, {"category": "counting", "objects": [obj], "count": 2})
        assert not checker.check(image, {"category": "counting", "objects": [obj], "count": 4})


def test_swapped_relation_fails_position():
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    rng = np.random.default_rng(0)
    for _ in range(30):
        spec = shapes.random_spec(rng, "position")
        image = shapes.render(spec, 32, rng)
        flipped = {**spec, "relation": opposite[spec["relation"]]}
        swapped_objects = {**spec, "objects": spec["objects"][::-1]}
        assert checker.check(image, spec)
        assert not checker.check(image, flipped)
        assert not checker.check(image, swapped_objects)


def test_swapped_colours_fail_color_attr():
    rng = np.random.default_rng(0)
    for _ in range(30):
        spec = shapes.random_spec(rng, "color_attr")
        image = shapes.render(spec, 32, rng)
        swapped = copy.deepcopy(spec)
        a, b = swapped["objects"]
        a["color"], b["color"] = b["color"], a["color"]
        assert checker.check(image, spec)
        assert not checker.check(image, swapped)
        # two_object only asks that both shapes are there, so it still passes.
        assert checker.check(image, {**swapped, "category": "two_object"})


def test_missing_object_fails_two_object():
    image = shapes.render({"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]}, 32, 0)
    spec = {
        "category": "two_object",
        "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "red"}],
    }
    assert not checker.check(image, spec)


def perturbations(image, rng):
    """A few model-like corruptions of a uint8 (H, W, 3) render."""
    x = image.astype(np.float32)
    blurred = x.copy()  # a 3x3 box blur at 50%: soft edges, as a decoder draws them
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(pad[dy : dy + x.shape[0], dx : dx + x.shape[1]] for dy in range(3) for dx in range(3)) / 9
    blurred = 0.5 * x + 0.5 * box
    jitter = np.clip(x + rng.uniform(-40, 40, size=(1, 1, 3)) * (x > 0) + rng.normal(0, 12, x.shape), 0, 255)
    speckled = x.copy()
    ys, xs = rng.integers(0, x.shape[0], 6), rng.integers(0, x.shape[1], 6)
    speckled[ys, xs] = rng.choice([0, 255], size=(6, 3))
    return {
        name: np.clip(v, 0, 255).round().astype(np.uint8)
        for name, v in dict(blur=blurred, jitter=jitter, speckles=speckled).items()
    }


def test_verdicts_hold_under_model_like_perturbations():
    rng = np.random.default_rng(7)
    failures = {}
    for i in range(60):
        spec = shapes.random_spec(rng, shapes.CATEGORIES[i % 6])
        image = shapes.render(spec, rng=rng)
        for name, bad in perturbations(image, rng).items():
            failures.setdefault(name, []).append(not checker.check(bad, spec))
    rates = {k: float(np.mean(v)) for k, v in failures.items()}
    assert all(r <= 0.05 for r in rates.values()), rates


def test_an_object_a_pixel_smaller_or_larger_keeps_its_shape():
    for shape in shapes.SHAPES:
        for side in range(shapes.OBJ_MIN - 1, shapes.OBJ_MAX + 2):  # one px beyond the renderer's range
            canvas = np.zeros((32, 32, 3), dtype=np.uint8)
            canvas[4 : 4 + side, 4 : 4 + side][shapes.shape_mask(shape, side)] = shapes.PALETTE["red"]
            found = checker.detect(canvas)
            assert [o["shape"] for o in found] == [shape], (shape, side, found)


def test_squares_with_ragged_edges_stay_squares_and_circles_stay_circles():
    """What the shipped backbones draw (tests/data/handchecked/): squares with a ragged extra column or
    row on an edge (a decoder's soft edge half over the colour threshold), which brings their fill down
    to a circle's (0.82-0.85), squares with one corner slanted, and a stray pixel on an edge. The corner
    reach tells them from circles, whose corners stay empty at every size."""

    def detect_one(mask):
        canvas = np.zeros((32, 32, 3), dtype=np.uint8)
        canvas[4 : 4 + mask.shape[0], 4 : 4 + mask.shape[1]][mask] = shapes.PALETTE["green"]
        found = checker.detect(canvas)
        assert len(found) == 1, found
        return found[0]["shape"]

    for side in range(shapes.OBJ_MIN, shapes.OBJ_MAX + 2):
        ragged = np.zeros((side + 1, side + 1), bool)
        ragged[:side, 1:] = True
        ragged[side - 2 : side, 0] = True  # the left column filled on its last two rows only
        ragged[side, 1] = True  # and one pixel of a row below
        fill = ragged.sum() / ragged.size
        assert fill < checker.SQUARE_MIN_FILL or side < 9  # fill alone would call it a circle
        assert detect_one(ragged) == "square", side
        slanted = np.ones((side, side), bool)
        for k in range(side // 3):  # one corner cut along a diagonal
            slanted[-1 - k, : side // 3 - k] = False
        assert detect_one(slanted) == "square", side
        stray = np.zeros((side + 1, side), bool)
        stray[1:] = True
        stray[0, 1] = True  # one pixel above the top edge
        assert detect_one(stray) == "square", side
        circle = shapes.shape_mask("circle", side)
        assert detect_one(circle) == "circle", side
        stray_circle = np.zeros((side + 1, side), bool)
        stray_circle[1:] = circle
        stray_circle[0, side // 2] = True
        assert detect_one(stray_circle) == "circle", side


def test_protocol_seeds_follow_the_rule():
    pairs = checker.protocol_seeds(3, samples=4)
    assert pairs[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4)] and pairs[-1] == (2, 11)
    assert checker.protocol_seeds(1, which="dev")[0] == (0, 1_000_000)


def test_protocol_scores_and_intervals_by_hand():
    specs = [shapes.random_spec(np.random.default_rng(i), "single_object") for i in range(4)] + [
        shapes.random_spec(np.random.default_rng(i), "colors") for i in range(4)
    ]
    images = []
    for i, spec in enumerate(specs):  # single object: prompt i gets i of 4 images right; colours: all right
        right = shapes.render(spec, rng=i)
        wrong = np.zeros_like(right)
        images += [right if (k < i % 4 or spec["category"] == "colors") else wrong for k in range(4)]
    scores = checker.protocol_scores(images, specs, samples=4, resamples=500)
    assert scores["single_object"][0] == pytest.approx(np.mean([0, 0.25, 0.5, 0.75]))
    assert scores["colors"] == (1.0, 1.0, 1.0)  # no spread: a zero-width interval
    assert scores["mean"][0] == pytest.approx((0.375 + 1) / 2)
    low, high = scores["single_object"][1:]
    assert 0 <= low < 0.375 < high <= 0.75  # bounded by the prompt scores
    assert scores["overcount_single"] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        checker.protocol_scores(images[:-1], specs)


def test_overcount_counts_extra_objects():
    spec = {"category": "counting", "objects": [{"shape": "circle", "color": "red"}], "count": 2}
    three = shapes.render(dict(spec, count=3), rng=0)
    two = shapes.render(spec, rng=0)
    assert checker.overcount(three, spec) is True and checker.overcount(two, spec) is False
    single = {"category": "single_object", "objects": [{"shape": "square", "color": "blue"}]}
    twice = shapes.render(dict(single, category="counting", count=2), rng=1)
    assert (
        checker.overcount(twice, single) is True and checker.overcount(shapes.render(single, rng=1), single) is False
    )
    assert checker.overcount(two, {"category": "colors", "objects": spec["objects"]}) is None


def test_checker_agrees_with_the_hand_checked_generated_images():
    """72 generated images (the first 4 dev prompts of each category, sample 0 of the protocol's seed
    rule): tiny-sd1.5 (7,414 pretraining steps, the shipped weights), tiny-sd3 at 5,232 steps and at
    10,500 (the shipped weights), each judged by eye with GenEval's rules (labels.json). With the corner
    reach the checker agrees on 66 of 72 (it was 59 of 72 on fill ratio alone, which called rounded
    squares circles); it accepts one image the eye rejects (a red pentagon-like blob read as a square)
    and rejects five the eye accepts (merged or touching objects, a rounded triangle, a faint circle)."""
    import json

    from PIL import Image

    folder = os.path.join(os.path.dirname(__file__), "data", "handchecked")
    labels = json.load(open(os.path.join(folder, "labels.json")))
    verdicts = [
        checker.check(np.asarray(Image.open(os.path.join(folder, label["file"])).convert("RGB")), label["spec"])
        for label in labels
    ]
    agree = sum(v == label["by_eye"] for v, label in zip(verdicts, labels))
    accepted_wrongly = sum(v and not label["by_eye"] for v, label in zip(verdicts, labels))
    assert len(labels) == 72 and agree >= 66 and accepted_wrongly <= 1, (agree, accepted_wrongly)


def test_paired_difference_by_hand():
    """Per-prompt differences resampled together: a variant equal to the base differs by exactly 0, and
    one that adds a constant to every prompt differs by that constant with a zero-width interval, where
    the two intervals side by side would overlap."""
    rng = np.random.default_rng(0)
    base = {"mean": {c: rng.random(40) for c in ("colors", "counting")}}
    same = checker.paired_difference(base, base)
    assert same["mean"] == (0.0, 0.0, 0.0)
    shifted = {"mean": {c: v + 0.05 for c, v in base["mean"].items()}}
    diff, low, high = checker.paired_difference(shifted, base)["mean"]
    assert diff == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    _, base_low, base_high = checker.bootstrap_interval(base)["mean"]
    assert base_high - base_low > 0.1  # each alone: a wide interval
    noisy = {"mean": {c: v + rng.normal(0.05, 0.01, 40) for c, v in base["mean"].items()}}
    diff, low, high = checker.paired_difference(noisy, base)["mean"]
    assert low < diff < high and high - low < 0.02 and low > 0
