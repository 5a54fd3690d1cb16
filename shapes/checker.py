"""
checker.py: judging images of the shapes world, GenEval-style but exact, and the evaluation protocol
with statistical power (4 seeds per prompt fixed by rule, bootstrap intervals, over-counting).

GenEval (used by both papers) runs an object detector over generated images. Ours knows the world
(shapes/world.py): it recovers objects by nearest-palette-colour masks and connected components, and reads
the shape off the fill ratio of each component in its bounding box (square 1.0, circle ~0.79,
triangle ~0.5) and, between squares and circles, how far it reaches into the box's corners.
check(image, spec) applies the category's rule; score() gives the per-category
fractions and their mean, as GenEval's overall score. Plain numpy / torch: no scipy, no detector.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import files
import shapes
from shapes import BACKGROUND, CATEGORIES, COLORS, PALETTE, relation_holds, to_uint8

# Checker thresholds (see detect / classify_shape).
# COLOR_MAX_DIST and SQUARE_MIN_FILL were set on perturbed renders (tests/lab/test_checker.py): a decoder's soft
# edges leave a white square's corner pixels ~123 from white, and a 7 px square without its 4 corners
# fills 0.918 of its box, while a circle a pixel under the renderer's smallest (6 px) fills 0.889;
# every palette pair is >= 255 apart, so the nearest colour still decides.
COLOR_MAX_DIST = 150.0  # a pixel further than this from every colour is "no colour"
MIN_AREA = 12  # components smaller than this (at 32 px) are speckles
SQUARE_MIN_FILL = 0.90  # fill ratio >= this: square (renderer gives exactly 1.0)
SQUARE_MIN_REACH = 1.5  # or a circle's fill but reaching 3 of 4 corners: a square with ragged edges
REACH_TRIM = 0.25  # corner_reach ignores edge rows / columns this sparse (stray pixels)
CIRCLE_MIN_FILL = 0.66  # in [0.66, 0.92): circle (renderer: 0.755-0.852)
TRIANGLE_MIN_FILL = 0.38  # in [0.38, 0.66): triangle (renderer: 0.50-0.60)
MAX_ASPECT = 1.5  # renderer's boxes are ~square; long thin blobs are not shapes
MAX_EXTENT = 0.75  # a blob spanning >75% of the canvas is a colour wash, not an object


# ----------------------------------------------------------------------------
# Exact checker


def connected_components(mask):
    """4-connected labels of a boolean mask (0 = off), dependency-free.

    Each on-pixel starts with its own label and repeatedly takes the minimum
    over itself and its on-neighbours; at the fixed point every component
    carries its smallest pixel index. Iterations ~ component diameter, which
    is tiny on 32-64 px canvases.
    """
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            return np.where(mask, labels, 0)
        labels = new


def corner_reach(xs, ys, x0, y0, x1, y1):
    """How far a component reaches into the corners of its box: per quadrant, the largest
    |dx| / a + |dy| / b of its pixels (a, b the box's half-sides, d from the box centre), and the third
    largest of the four (a generated square often loses one corner to a slanted edge).
    A square reaches every corner (rendered: 1.71-1.80, pixel centres stop half a pixel
    short of 2); a circle reaches √2 = 1.41 at most (rendered: 1.14-1.40). Unlike the fill ratio, a
    square drawn with a ragged extra row or column (a decoder's soft edge half over the colour
    threshold) still reaches ~1.6-1.8, where its fill (0.82-0.85) is a circle's. SQUARE_MIN_REACH = 1.5
    was set on the hand-checked generated images (dev prompts): their circles reach at most 1.43, their
    squares 1.48 and up. Rows and columns holding under a quarter of the fullest one's pixels are left out of the
    box first: a stray pixel on an edge would otherwise move the corners away from the shape (a
    circle's top row holds a third or more of its widest; only a triangle's apex holds less, and
    triangles are told by their fill before the reach is read)."""
    rows, cols = np.bincount(ys - y0), np.bincount(xs - x0)
    kept_rows, kept_cols = (
        np.nonzero(rows >= REACH_TRIM * rows.max())[0],
        np.nonzero(cols >= REACH_TRIM * cols.max())[0],
    )
    y0, y1, x0, x1 = y0 + kept_rows[0], y0 + kept_rows[-1], x0 + kept_cols[0], x0 + kept_cols[-1]
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    xs, ys = xs[inside], ys[inside]
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    reach = np.abs(xs - cx) / a + np.abs(ys - cy) / b
    quadrants = [(xs <= cx) & (ys <= cy), (xs >= cx) & (ys <= cy), (xs <= cx) & (ys >= cy), (xs >= cx) & (ys >= cy)]
    return float(sorted(reach[q].max() if q.any() else 0.0 for q in quadrants)[1])  # the 3rd-best corner


def classify_shape(fill, height, width, size, reach=0.0):
    """Shape name from the fill ratio of a component in its bbox and its corner_reach, or None."""
    if max(height, width) > min(height, width) * MAX_ASPECT or max(height, width) > MAX_EXTENT * size:
        return None
    if fill >= SQUARE_MIN_FILL or (fill >= CIRCLE_MIN_FILL and reach >= SQUARE_MIN_REACH):
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    if fill >= TRIANGLE_MIN_FILL:
        return "triangle"
    return None


def detect(image):
    """Objects in an image -> list of {color, shape, area, centroid (x, y), bbox (x0, y0, x1, y1)}.

    Pixels are assigned to the nearest of palette + background (if within
    COLOR_MAX_DIST); per colour, 4-connected components of at least MIN_AREA
    pixels whose fill ratio and aspect look like one of our shapes are
    objects. Speckles and blobs that look like no shape are dropped.
    """
    image = to_uint8(image)
    h, w, _ = image.shape
    refs = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - refs, axis=-1)  # (H, W, 1+K)
    nearest = dist.argmin(-1)
    nearest[dist.min(-1) > COLOR_MAX_DIST] = 0  # too far from every colour: treat as background
    min_area = round(MIN_AREA * h * w / (32 * 32))
    objects = []
    for k, color in enumerate(COLORS, start=1):
        mask = nearest == k
        if mask.sum() < min_area:  # cheap exit: not even one object's worth of this colour
            continue
        labels = connected_components(mask)
        areas = np.bincount(labels.ravel())
        areas[0] = 0
        for label in np.nonzero(areas >= min_area)[0]:
            ys, xs = np.nonzero(labels == label)
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            bh, bw = y1 - y0 + 1, x1 - x0 + 1
            shape = classify_shape(len(ys) / (bh * bw), bh, bw, max(h, w), corner_reach(xs, ys, x0, y0, x1, y1))
            if shape is None:
                continue
            objects.append(
                {
                    "color": color,
                    "shape": shape,
                    "area": int(len(ys)),
                    "centroid": (float(xs.mean()), float(ys.mean())),
                    "bbox": (int(x0), int(y0), int(x1), int(y1)),
                }
            )
    return objects


def check(image, spec):
    """Is the image correct for the spec? GenEval's per-category rules."""
    objects = detect(image)
    size = to_uint8(image).shape[1]
    spec_objs = spec["objects"]

    def matches(o, want, with_color=True):
        return o["shape"] == want["shape"] and (not with_color or o["color"] == want["color"])

    category = spec["category"]
    if category == "single_object":  # the shape is there (any colour)
        return any(matches(o, spec_objs[0], False) for o in objects)
    if category == "two_object":  # both shapes are there (any colour)
        return all(any(matches(o, want, False) for o in objects) for want in spec_objs)
    if category == "counting":  # exactly `count` of the shape, all of the right colour
        want = spec_objs[0]
        n_shape = sum(matches(o, want, False) for o in objects)
        n_exact = sum(matches(o, want) for o in objects)
        return n_shape == spec["count"] and n_exact == spec["count"]
    if category == "colors":  # the shape is there with the right colour
        return any(matches(o, spec_objs[0]) for o in objects)
    if category == "color_attr":  # both colour-shape bindings hold
        return all(any(matches(o, want) for o in objects) for want in spec_objs)
    if category == "position":  # some a, b matching the spec stand in the relation
        a_s = [o for o in objects if matches(o, spec_objs[0])]
        b_s = [o for o in objects if matches(o, spec_objs[1])]
        return any(
            relation_holds(a["centroid"], b["centroid"], spec["relation"], size)
            for a in a_s
            for b in b_s
            if a is not b
        )
    raise ValueError(f"unknown category {category!r}")


def score(images, specs):
    """Fraction correct per category present, plus "mean" over those categories
    (GenEval's overall score; with the shipped eval set that is all six)."""
    results = {}
    for image, spec in zip(images, specs):
        results.setdefault(spec["category"], []).append(check(image, spec))
    scores = {c: float(np.mean(results[c])) for c in CATEGORIES if c in results}
    scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


# ----------------------------------------------------------------------------
# The evaluation protocol. GenEval samples 4 images per prompt; so do we, with seeds that are a fixed
# function of (set, prompt index, sample number), never chosen. A prompt's score is the mean of its 4
# verdicts; a category's score the mean over its prompts; the overall score the mean of the six
# categories. The 95% intervals come from a bootstrap over prompts (resampled within each category,
# the same resamples for every column, a fixed generator): they answer "how much would the number move
# with other prompts like these", which also covers the sampling noise of the 4 images.


SAMPLES_PER_PROMPT = 4


SEED_BASE = {"eval": 0, "dev": 1_000_000}


def protocol_seeds(n_prompts, samples=SAMPLES_PER_PROMPT, which="eval"):
    """(prompt index, seed) pairs in sampling order: prompt i, sample k -> seed base + samples * i + k."""
    return [(i, SEED_BASE[which] + samples * i + k) for i in range(n_prompts) for k in range(samples)]


def overcount(image, spec):
    """Does the image hold more of the asked object than asked? Counting prompts: more objects of the
    asked shape (any colour) than the count; single-object prompts: the object (shape and colour) more
    than once. None for other categories. (AGSM's failure mode of contrastive tokens: repetition.)"""
    if spec["category"] not in ("counting", "single_object"):
        return None
    want = spec["objects"][0]
    objects = detect(image)
    if spec["category"] == "counting":
        return sum(o["shape"] == want["shape"] for o in objects) > spec["count"]
    return sum(o["shape"] == want["shape"] and o["color"] == want["color"] for o in objects) > 1


def bootstrap_interval(groups, resamples=2000, seed=0):
    """groups: {column: {category: per-prompt values (P,)}} -> {column: (mean, low, high)}, where a
    column's value is the mean over its categories of the mean over prompts, and the interval is the
    2.5-97.5 percentile of that value over bootstrap resamples of the prompts within each category."""
    rng = np.random.default_rng(seed)
    categories = sorted({c for g in groups.values() for c in g})
    lengths = {c: max(len(g[c]) for g in groups.values() if c in g) for c in categories}
    picks = {c: rng.integers(0, lengths[c], size=(resamples, lengths[c])) for c in categories}
    out = {}
    for column, per_category in groups.items():
        values = {c: np.asarray(v, dtype=float) for c, v in per_category.items() if len(v)}
        if not values:
            continue
        point = np.mean([v.mean() for v in values.values()])
        boots = np.mean([v[picks[c]].mean(axis=1) for c, v in values.items()], axis=0)
        out[column] = (float(point), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
    return out


def verdicts_and_groups(images, records, pairs, samples=SAMPLES_PER_PROMPT):
    """(each image's verdict, per-prompt groups as JSON lists) of images sampled for `pairs` (prompt index,
    seed) of `records`, prompt-major: what the lab's scoring tools (ladder_eval, gated_eval) record."""
    specs = [r["spec"] for r in records]
    verdicts = [bool(check(images[k], specs[p])) for k, (p, _) in enumerate(pairs)]
    groups = protocol_groups(images, specs, samples)
    return verdicts, {c: {k: [float(x) for x in v] for k, v in g.items()} for c, g in groups.items()}


def protocol_groups(images, specs, samples=SAMPLES_PER_PROMPT):
    """images in protocol order (prompt-major, `samples` per prompt) and the prompts' specs -> the
    per-prompt values bootstrap_interval takes: {column: {category: (P,)}} for every category, "mean",
    and the over-counting rates "overcount_counting" and "overcount_single"."""
    if len(images) != samples * len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} prompts x {samples} samples")
    per_prompt, over = {}, {"overcount_counting": {}, "overcount_single": {}}
    for i, spec in enumerate(specs):
        shots = images[samples * i : samples * (i + 1)]
        per_prompt.setdefault(spec["category"], []).append(np.mean([check(im, spec) for im in shots]))
        flags = [overcount(im, spec) for im in shots]
        if flags[0] is not None:
            key = "overcount_counting" if spec["category"] == "counting" else "overcount_single"
            over[key].setdefault(spec["category"], []).append(np.mean(flags))
    groups = {c: {c: v} for c, v in per_prompt.items()}
    groups["mean"] = per_prompt
    groups.update({k: v for k, v in over.items() if v})
    return groups


def ordered(result):
    return {
        k: result[k]
        for k in [c for c in CATEGORIES if c in result] + ["mean", "overcount_counting", "overcount_single"]
        if k in result
    }


def protocol_scores(images, specs, samples=SAMPLES_PER_PROMPT, resamples=2000):
    """{column: (value, low, high)}: each category, "mean" and the over-counting rates, 95% intervals."""
    return ordered(bootstrap_interval(protocol_groups(images, specs, samples), resamples))


def paired_difference(groups, base_groups, resamples=2000):
    """{column: (difference, low, high)} of a variant against the base, prompt by prompt. Both sampled the
    same prompts with the same seeds, so the difference is resampled per prompt (the same resamples as
    bootstrap_interval's): the prompt-to-prompt spread that both share cancels, and the interval is that
    of the difference itself, much narrower than the two intervals side by side."""
    diff = {
        col: {c: np.asarray(v, float) - np.asarray(base_groups[col][c], float) for c, v in g.items()}
        for col, g in groups.items()
        if col in base_groups
    }
    return ordered(bootstrap_interval(diff, resamples))


def format_scores(scores):
    """One line: 'single_object 0.912 [0.87, 0.95] ...'."""
    return "  ".join(f"{k} {v:.3f} [{lo:.3f}, {hi:.3f}]" for k, (v, lo, hi) in scores.items())


# ----------------------------------------------------------------------------
# Editing cases (edit.py --shapes-check): success is the edited image passing check() for the target.


def shapes_edit_cases(n, seed=0):
    """n rendered single objects and an edit of each: the colour (even cases) or the shape (odd ones)."""
    rng = np.random.default_rng(seed)
    images, sources, targets, target_specs = [], [], [], []
    for i in range(n):
        spec = shapes.random_spec(rng, "colors")
        new = dict(spec["objects"][0])
        if i % 2 == 0:
            new["color"] = str(rng.choice([c for c in shapes.COLORS if c != new["color"]]))
        else:
            new["shape"] = str(rng.choice([s for s in shapes.SHAPES if s != new["shape"]]))
        target = {"category": "colors", "objects": [new]}
        images.append(shapes.to_tensor(shapes.render(spec, rng=seed + i)[None])[0])
        sources.append(shapes.caption(spec))
        targets.append(shapes.caption(target))
        target_specs.append(target)
    return torch.stack(images), sources, targets, target_specs


# ----------------------------------------------------------------------------
# A differentiable counter: the detector of SoftREPA's counting loss (app. D; losses.py) in this world.
# The exact checker above reads pixels, so no gradient reaches the denoiser through it; this CNN, trained
# on renders by shapes/counter.py (held-out accuracy in the README), gives each shape's expected count.

COUNTER_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "counter.safetensors")
MAX_COUNT = 4  # the world draws 1-4 objects; a shape's count is 0-4


class ShapesCounter(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> logits (B, shapes, MAX_COUNT + 1)."""

    def __init__(self, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),  # 16 x 16
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),  # 8 x 8
            nn.Flatten(),
            nn.Linear(2 * width * 64, 128),
            nn.SiLU(),
        )
        self.head = nn.Linear(128, len(shapes.SHAPES) * (MAX_COUNT + 1))

    def forward(self, images):
        if images.shape[-1] != 32:  # the counter reads the world's 32 px
            images = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True)
        return self.head(self.features(images.float())).view(-1, len(shapes.SHAPES), MAX_COUNT + 1)

    def soft_count(self, images, nouns):
        """(B,) expected count of each row's shape (noun: "square", "circle", "triangle"); NaN for
        another noun (no counting loss on that row)."""
        p = torch.softmax(self(images), dim=-1)  # (B, shapes, counts)
        expected = (p * torch.arange(MAX_COUNT + 1, device=p.device, dtype=p.dtype)).sum(-1)  # (B, shapes)
        index = torch.tensor([shapes.SHAPES.index(n) if n in shapes.SHAPES else 0 for n in nouns], device=p.device)
        counts = expected.gather(1, index.view(-1, 1))[:, 0]
        known = torch.tensor([n in shapes.SHAPES for n in nouns], device=p.device)
        return torch.where(known, counts, torch.full_like(counts, float("nan")))


def load_counter(path=None):
    """--counter FILE on the tiny models (None: the shipped one): a shapes counter's weights, checked for their
    kind before they load -- a token file, a checkpoint or a detector's weights given here is one line."""
    if path is None and not os.path.exists(COUNTER_WEIGHTS):
        raise SystemExit(f"no shapes counter at {COUNTER_WEIGHTS}: train one with python -m shapes.counter")
    path = path or COUNTER_WEIGHTS
    expected = "a shapes counter's weights (python -m shapes.counter) or a transformers object-detector folder"
    files.check_kind(path, {"counter"}, "--counter", expected)
    model = ShapesCounter()
    files.load_weights(model, path, "the shapes counter (shapes/checker.py)")
    return model.eval().requires_grad_(False)
