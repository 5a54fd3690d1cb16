# Tests for the shapes world (shapes/world.py): the tokenizer, the stream, the loose captions and the shipped
# eval and dev sets must be consistent. The checker: tests/lab/test_checker.py.

import numpy as np
import pytest
import torch

import shapes
from shapes import checker


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
    captions += [shapes.loose_caption(shapes.random_spec(rng), rng) for _ in range(500)]  # "some" is theirs
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
    # The file is exactly what `python -m shapes.world --write-eval` produces.
    assert items == shapes.make_eval_set(shapes.EVAL_N_PER_CATEGORY, shapes.EVAL_SEED)


# -----------------------------------------------------------------------------
# Generated images are not renders: the verdicts must survive what a VAE decoder and a diffusion model
# do to an image (blur, colour drift, speckles, an object a pixel smaller or larger)

# -----------------------------------------------------------------------------
# Loose pretraining captions, the dev set and the evaluation protocol


def test_loose_captions_are_true_but_incomplete():
    rng = np.random.default_rng(0)
    words = set(shapes.VOCAB)
    for i in range(300):
        spec = shapes.random_spec(rng, shapes.CATEGORIES[i % 6])
        loose = shapes.loose_caption(spec, rng)
        assert set(loose.split()) <= words and loose != ""
        named = [w for w in loose.replace("s ", " ").split() if w in shapes.SHAPES] + [
            w[:-1] for w in loose.split() if w[:-1] in shapes.SHAPES
        ]
        assert set(named) <= {o["shape"] for o in spec["objects"]}  # nothing that is not drawn
        if spec["category"] == "counting":
            assert not any(w in loose.split() for w in shapes.COUNT_WORDS.values())
        if spec["category"] in ("single_object", "colors"):
            assert loose == f"a {spec['objects'][0]['shape']}"
        assert not any(p in loose for p in ("left of", "right of", "above", "below"))
    images, captions, specs = next(shapes.stream(3, 400, loose=0.25))
    share = np.mean([c != shapes.caption(s) for c, s in zip(captions, specs)])
    assert 0.1 < share < 0.25  # 25% drawn loose, a few of which equal the precise caption


def test_dev_set_is_fixed_and_avoids_eval_prompts_where_it_can():
    dev, evaluation = shapes.load_dev_set(), shapes.load_eval_set()
    assert dev == shapes.make_dev_set()  # the file is what the code writes
    seen = {r["prompt"] for r in evaluation}
    for category in ("two_object", "position", "color_attr"):
        prompts = [r["prompt"] for r in dev if r["spec"]["category"] == category]
        unseen = [s for s in shapes.all_specs(category) if shapes.caption(s) not in seen]
        assert len(prompts) == shapes.DEV_N_PER_CATEGORY
        assert len({p for p in prompts if p not in seen}) == min(len(prompts), len(unseen))
    dev_seeds = {s for _, s in checker.protocol_seeds(len(dev), which="dev")}
    eval_seeds = {s for _, s in checker.protocol_seeds(len(evaluation), which="eval")}
    assert not dev_seeds & eval_seeds


def test_swapped_captions_exchange_the_colours_of_every_two_colour_caption():
    spec = {
        "category": "color_attr",
        "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
    }
    assert shapes.swapped_caption(spec) == "a blue circle and a red square"
    position = {**spec, "category": "position", "relation": "above"}
    assert shapes.swapped_caption(position) == "a blue circle above a red square"
    same = {**spec, "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "red"}]}
    assert not shapes.can_swap(same) and not shapes.can_swap({"category": "counting", "objects": spec["objects"][:1]})
    precise = next(shapes.stream(5, 200, loose=0.25))[1]
    assert next(shapes.stream(5, 200, loose=0.25, swap=0.0))[1] == precise  # swap=0 is the default
    _, captions, specs = next(shapes.stream(5, 300, swap=1.0))
    for text, spec in zip(captions, specs):
        expected = shapes.swapped_caption(spec) if shapes.can_swap(spec) else shapes.caption(spec)
        assert text == expected
    swapped = {s["category"] for s, text in zip(specs, captions) if text != shapes.caption(s)}
    assert swapped == {"two_object", "position", "color_attr"}
