# Tests for the shapes world (shapes.py): the exact checker must agree with the
# renderer, reject noise and wrong images, and the tokenizer / stream / shipped
# eval set must be consistent. CPU only, a few seconds.

import copy
import os

import numpy as np
import pytest
import torch

import shapes
import checker


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
        image[y:y + side, x:x + side][shapes.shape_mask(shape, side)] = shapes.PALETTE[color]
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
    spec = {"category": "two_object", "objects": [{"shape": "circle", "color": "red"},
                                                   {"shape": "square", "color": "red"}]}
    assert not checker.check(image, spec)


def test_tokenize_empty_prompt_and_round_trip():
    ids = shapes.tokenize(["", "a red circle"])
    assert ids.shape == (2, shapes.MAX_LEN) and ids.dtype == torch.long
    assert ids[0, :2].tolist() == [shapes.BOS_ID, shapes.EOS_ID]
    assert (ids[0, 2:] == shapes.PAD_ID).all()
    w = shapes.WORD_TO_ID
    assert ids[1, :5].tolist() == [shapes.BOS_ID, w["a"], w["red"], w["circle"], shapes.EOS_ID]
    assert [shapes.VOCAB[i] for i in ids[1, 1:4]] == ["a", "red", "circle"]
    assert shapes.tokenize(["A  RED zebra"])[0, 1:5].tolist() == [w["a"], w["red"], shapes.UNK_ID, shapes.EOS_ID]
    assert shapes.VOCAB[:3] == ["<pad>", "<bos>", "<unk>"] and shapes.VOCAB[-1] == "<eos>"


def test_tokenize_rejects_long_prompts():
    shapes.tokenize([" ".join(["a"] * (shapes.MAX_LEN - 2))])
    with pytest.raises(ValueError):
        shapes.tokenize([" ".join(["a"] * (shapes.MAX_LEN - 1))])


def test_eos_is_pooled_by_both_clip_pooling_rules():
    # transformers' CLIPTextTransformer pools at ids.argmax(-1) when
    # eos_token_id == 2, else at the first ids == eos_token_id. Both must land
    # on our EOS position (checked here without importing transformers).
    ids = shapes.tokenize(["", "a red circle", "a yellow triangle to the right of a green circle"])
    eos_position = torch.tensor([1, 4, 11])  # bos + n words
    assert torch.equal(ids.argmax(-1), eos_position)
    assert torch.equal((ids == shapes.EOS_ID).int().argmax(-1), eos_position)


def test_every_caption_tokenizes_without_unk():
    captions = [shapes.caption(s) for c in shapes.CATEGORIES for s in shapes.all_specs(c)]
    rng = np.random.default_rng(0)
    captions += [shapes.caption(shapes.random_spec(rng)) for _ in range(500)]
    captions += [shapes.loose_caption(shapes.random_spec(rng), rng) for _ in range(500)]   # "some" is theirs
    ids = shapes.tokenize(captions)
    assert not (ids == shapes.UNK_ID).any()
    used = set(ids.unique().tolist())
    assert used == set(range(len(shapes.VOCAB))) - {shapes.UNK_ID}  # no dead words either


def test_stream_is_reproducible():
    def take(seed):
        gen = shapes.stream(seed, batch_size=8)
        return [next(gen) for _ in range(2)]
    a, b, c = take(123), take(123), take(124)
    for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
        assert torch.equal(ia, ib) and ca == cb and sa == sb
    assert a[0][0].shape == (8, 3, 32, 32) and a[0][0].dtype == torch.float32
    assert a[0][0].min() >= -1 and a[0][0].max() <= 1
    assert a[0][1] == [shapes.caption(s) for s in a[0][2]]
    assert a[0][1] != c[0][1]
    images, _, specs = next(shapes.stream(0, batch_size=6, categories=["position"]))
    assert all(s["category"] == "position" for s in specs)
    assert all(checker.check(im, s) for im, s in zip(images, specs))


def test_shipped_eval_set_is_consistent():
    items = shapes.load_eval_set()
    categories = [it["spec"]["category"] for it in items]
    assert {c: categories.count(c) for c in shapes.CATEGORIES} == {c: 80 for c in shapes.CATEGORIES}
    assert all(shapes.caption(it["spec"]) == it["prompt"] for it in items)
    # The file is exactly what `python shapes.py --write-eval` produces.
    assert items == shapes.make_eval_set(shapes.EVAL_N_PER_CATEGORY, shapes.EVAL_SEED)


# -----------------------------------------------------------------------------
# Generated images are not renders: the verdicts must survive what a VAE decoder and a diffusion model
# do to an image (blur, colour drift, speckles, an object a pixel smaller or larger)

def perturbations(image, rng):
    """A few model-like corruptions of a uint8 (H, W, 3) render."""
    x = image.astype(np.float32)
    blurred = x.copy()   # a 3x3 box blur at 50%: soft edges, as a decoder draws them
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(pad[dy:dy + x.shape[0], dx:dx + x.shape[1]] for dy in range(3) for dx in range(3)) / 9
    blurred = 0.5 * x + 0.5 * box
    jitter = np.clip(x + rng.uniform(-40, 40, size=(1, 1, 3)) * (x > 0) + rng.normal(0, 12, x.shape), 0, 255)
    speckled = x.copy()
    ys, xs = rng.integers(0, x.shape[0], 6), rng.integers(0, x.shape[1], 6)
    speckled[ys, xs] = rng.choice([0, 255], size=(6, 3))
    return {name: np.clip(v, 0, 255).round().astype(np.uint8)
            for name, v in dict(blur=blurred, jitter=jitter, speckles=speckled).items()}


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
        for side in range(shapes.OBJ_MIN - 1, shapes.OBJ_MAX + 2):   # one px beyond the renderer's range
            canvas = np.zeros((32, 32, 3), dtype=np.uint8)
            canvas[4:4 + side, 4:4 + side][shapes.shape_mask(shape, side)] = shapes.PALETTE["red"]
            found = checker.detect(canvas)
            assert [o["shape"] for o in found] == [shape], (shape, side, found)


# -----------------------------------------------------------------------------
# Loose pretraining captions, the dev set and the evaluation protocol

def test_loose_captions_are_true_but_incomplete():
    rng = np.random.default_rng(0)
    words = set(shapes.VOCAB)
    for i in range(300):
        spec = shapes.random_spec(rng, shapes.CATEGORIES[i % 6])
        loose = shapes.loose_caption(spec, rng)
        assert set(loose.split()) <= words and loose != ""
        named = [w for w in loose.replace("s ", " ").split() if w in shapes.SHAPES] + \
                [w[:-1] for w in loose.split() if w[:-1] in shapes.SHAPES]
        assert set(named) <= {o["shape"] for o in spec["objects"]}          # nothing that is not drawn
        if spec["category"] == "counting":
            assert not any(w in loose.split() for w in shapes.COUNT_WORDS.values())
        if spec["category"] in ("single_object", "colors"):
            assert loose == f"a {spec['objects'][0]['shape']}"
        assert not any(p in loose for p in ("left of", "right of", "above", "below"))
    images, captions, specs = next(shapes.stream(3, 400, loose=0.25))
    share = np.mean([c != shapes.caption(s) for c, s in zip(captions, specs)])
    assert 0.1 < share < 0.25            # 25% drawn loose, a few of which equal the precise caption


def test_dev_set_is_fixed_and_avoids_eval_prompts_where_it_can():
    dev, evaluation = shapes.load_dev_set(), shapes.load_eval_set()
    assert dev == shapes.make_dev_set()                                   # the file is what the code writes
    seen = {r["prompt"] for r in evaluation}
    for category in ("two_object", "position", "color_attr"):
        prompts = [r["prompt"] for r in dev if r["spec"]["category"] == category]
        unseen = [s for s in shapes.all_specs(category) if shapes.caption(s) not in seen]
        assert len(prompts) == shapes.DEV_N_PER_CATEGORY
        assert len({p for p in prompts if p not in seen}) == min(len(prompts), len(unseen))
    dev_seeds = {s for _, s in checker.protocol_seeds(len(dev), which="dev")}
    eval_seeds = {s for _, s in checker.protocol_seeds(len(evaluation), which="eval")}
    assert not dev_seeds & eval_seeds


def test_protocol_seeds_follow_the_rule():
    pairs = checker.protocol_seeds(3, samples=4)
    assert pairs[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4)] and pairs[-1] == (2, 11)
    assert checker.protocol_seeds(1, which="dev")[0] == (0, 1_000_000)


def test_protocol_scores_and_intervals_by_hand():
    specs = [shapes.random_spec(np.random.default_rng(i), "single_object") for i in range(4)] + \
            [shapes.random_spec(np.random.default_rng(i), "colors") for i in range(4)]
    images = []
    for i, spec in enumerate(specs):   # single object: prompt i gets i of 4 images right; colours: all right
        right = shapes.render(spec, rng=i)
        wrong = np.zeros_like(right)
        images += [right if (k < i % 4 or spec["category"] == "colors") else wrong for k in range(4)]
    scores = checker.protocol_scores(images, specs, samples=4, resamples=500)
    assert scores["single_object"][0] == pytest.approx(np.mean([0, 0.25, 0.5, 0.75]))
    assert scores["colors"] == (1.0, 1.0, 1.0)                            # no spread: a zero-width interval
    assert scores["mean"][0] == pytest.approx((0.375 + 1) / 2)
    low, high = scores["single_object"][1:]
    assert 0 <= low < 0.375 < high <= 0.75                                # bounded by the prompt scores
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
    assert checker.overcount(twice, single) is True and checker.overcount(shapes.render(single, rng=1), single) is False
    assert checker.overcount(two, {"category": "colors", "objects": spec["objects"]}) is None


def test_checker_agrees_with_the_hand_checked_generated_images():
    """48 images generated by the shipped tiny-sd3 and tiny-sd1.5 (the first 4 dev prompts of each category,
    sample 0 of the protocol's seed rule), each judged by eye with GenEval's rules (labels.json). Measured
    when they were labelled: the checker agreed on 40 of 48; on all 8 others it rejected an image a person
    accepts (a rotated or rounded square, an octagonal circle, a 5 px triangle), so its scores understate."""
    import json
    from PIL import Image
    folder = os.path.join(os.path.dirname(__file__), "data", "handchecked")
    labels = json.load(open(os.path.join(folder, "labels.json")))
    verdicts = [checker.check(np.asarray(Image.open(os.path.join(folder, l["file"])).convert("RGB")), l["spec"])
                for l in labels]
    agree = sum(v == l["by_eye"] for v, l in zip(verdicts, labels))
    accepted_wrongly = sum(v and not l["by_eye"] for v, l in zip(verdicts, labels))
    assert len(labels) == 48 and agree >= 40 and accepted_wrongly == 0, (agree, accepted_wrongly)
