# shapes/world.py -- the shapes world: specs, captions, its word-level language, the renderer, the endless
# training stream and the dev / eval prompt sets. The exact checker and the evaluation protocol that
# judge its images are checker.py.
#
# An offline stand-in for COCO captions + the GenEval benchmark. The papers (SoftREPA, AGSM) train soft
# tokens on COCO and measure text-image alignment with GenEval's object detector. Neither is available
# offline, and a detector adds its own errors, so this tiny world has an exact "detector" (checker.py):
#   * images are 1-4 flat-coloured squares / circles / triangles on black,
#   * captions are generated from a structured spec (a JSON-able dict).
# Six prompt categories mirror GenEval's: single_object, two_object, counting, colors, position,
# color_attr; the overall score is their mean, as in GenEval. Plain numpy / torch.
#
# Two caption styles. Token training and evaluation use the precise captions of `caption`. Pretraining
# (pretrain.py) mixes in `loose_caption`s, which leave out a count, a colour, a relation or an object,
# and `swapped_caption`s, which exchange two colours, as web alt-text does: a base model trained on them
# binds weakly, like the real models whose failures the soft tokens are meant to fix.

import json
import os

import numpy as np
import torch

import files
import flags
from sampler import to_uint8  # noqa: F401  (shapes.to_uint8: the pixels of a PNG, as the sampler saves them)

# ----------------------------------------------------------------------------
# The world: shapes, palette, categories

SHAPES = ["square", "circle", "triangle"]

# Saturated colours at the corners of the RGB cube. Every pair of palette
# colours (and the background) is at least 255 apart in RGB, so "nearest
# palette colour" is unambiguous for the renderer's flat fills and still
# forgiving for a diffusion model's slightly-off colours.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
COLORS = list(PALETTE)
BACKGROUND = (0, 0, 0)

CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
# spec["relation"] -> words used in the caption. "above" / "below" read
# naturally without "to the".
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
RELATIONS = list(RELATION_PHRASES)

# Geometry at the reference size of 32 px; everything scales with size / 32.
# 7-10 px objects are big enough that the fill ratio separates the shapes
# (measured: circle 0.755-0.852, triangle 0.506-0.571 for sides 7..10) and
# small enough that four of them plus gaps always fit on a 32x32 canvas.
OBJ_MIN, OBJ_MAX = 7, 10
OBJ_GAP = 2  # min empty pixels between two objects' bounding boxes
BORDER = 1  # min empty pixels between an object and the canvas edge
POSITION_MARGIN = 0.1  # like GenEval: "left of" needs the centroids >= 0.1 * width apart


# ----------------------------------------------------------------------------
# Specs and captions


def random_spec(rng, category=None):
    """A random prompt spec. rng: np.random.Generator (or an int seed)."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]

    def obj(shape=None, color=None):
        return {
            "shape": shape or SHAPES[rng.integers(len(SHAPES))],
            "color": color or COLORS[rng.integers(len(COLORS))],
        }

    if category in ("single_object", "colors"):
        return {"category": category, "objects": [obj()]}
    if category == "counting":
        count = int(rng.integers(2, 5))
        return {"category": category, "objects": [obj()], "count": count}
    # The two-object categories use two *different* shapes, like GenEval's two
    # different classes; this also makes every object in the caption a distinct
    # thing the checker can find. color_attr additionally needs different
    # colours, otherwise swapping the bindings would not change the image.
    shape_a, shape_b = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    if category in ("two_object", "position"):
        spec = {"category": category, "objects": [obj(shape_a), obj(shape_b)]}
        if category == "position":
            spec["relation"] = RELATIONS[rng.integers(len(RELATIONS))]
        return spec
    if category == "color_attr":
        color_a, color_b = (COLORS[i] for i in rng.permutation(len(COLORS))[:2])
        return {"category": category, "objects": [obj(shape_a, color_a), obj(shape_b, color_b)]}
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def caption(spec):
    """The English prompt for a spec, e.g. 'a red circle to the left of a blue square'."""
    objs = [f"{o['color']} {o['shape']}" for o in spec["objects"]]
    category = spec["category"]
    if category in ("single_object", "colors"):
        return f"a {objs[0]}"
    if category == "counting":
        return f"{COUNT_WORDS[spec['count']]} {objs[0]}s"
    if category in ("two_object", "color_attr"):
        return f"a {objs[0]} and a {objs[1]}"
    if category == "position":
        return f"a {objs[0]} {RELATION_PHRASES[spec['relation']]} a {objs[1]}"
    raise ValueError(f"unknown category {category!r}")


# ----------------------------------------------------------------------------
# Vocabulary and tokenizer for our tiny CLIPTextModel encoders
#
# Pooling, as read in transformers 5.23 models/clip/modeling_clip.py
# (CLIPTextTransformer.forward): if config.eos_token_id == 2 it takes the
# *legacy* path and pools at input_ids.argmax(-1), i.e. it assumes EOS is the
# highest id in every sequence (true for OpenAI's BPE, where EOS = 49407).
# Otherwise it pools at the first position where input_ids == eos_token_id.
# An EOS at id 2 would therefore be pooled wrongly by a config with
# eos_token_id=2 (argmax would land on the biggest word id). So the EOS token
# is the LAST id of the vocabulary: then both configs pool the EOS position,
# eos_token_id=2 (argmax: pads are 0, words < EOS) and eos_token_id=EOS_ID
# (first match). Pads come after EOS and the text encoder is causal, so pads
# never change the pooled EOS state. The attention mask can be left out.
# (Do not leave CLIPTextConfig's default eos_token_id: no token has that id
# here, the match is all-false and it would silently pool position 0 = BOS.)

_WORDS = sorted(
    set(
        ["a", "and", "some"]
        + COLORS
        + SHAPES
        + [s + "s" for s in SHAPES]
        + list(COUNT_WORDS.values())
        + " ".join(RELATION_PHRASES.values()).split()
    )
)
VOCAB = ["<pad>", "<bos>", "<unk>"] + _WORDS + ["<eos>"]
PAD_ID, BOS_ID, UNK_ID, EOS_ID = 0, 1, 2, len(VOCAB) - 1
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_LEN = 16  # <bos> + up to 14 words + <eos>; the longest caption has 10 words
# The gated base's word (docs/gated/): a vocabulary entry of its own, after <eos> so that the shipped
# encoders' ids (and their EOS pooling) stay as they are. An encoder whose table has no row for it (the
# shipped bases) reads it as <unk>, as it reads any other unseen word: tokenize(vocab_size=...).
GATE_WORD = "exactly"
# Known words that may stand in the gate word's place as decoys (pretrain --decoy-kinds unk-word-vector):
# the words that name no colour and no shape, so a decoy never changes what the caption asks for.
DECOY_WORDS = [w for w in _WORDS if w not in COLORS and w not in SHAPES and w[:-1] not in SHAPES]
GATE_ID = len(VOCAB)
WORD_TO_ID[GATE_WORD] = GATE_ID


def language_problem(prompt):
    """Why the tiny text encoder cannot read `prompt` ("unknown words ...", "too long: N words"), or None."""
    words = prompt.lower().split()
    unknown = sorted({w for w in words if w not in WORD_TO_ID})
    if unknown:
        return "unknown words " + ", ".join(unknown)
    if len(words) + 2 > MAX_LEN:
        return f"too long: {len(words)} words, at most {MAX_LEN - 2}"
    return None


def tokenize(prompts, vocab_size=len(VOCAB)):
    """list[str] -> LongTensor (B, MAX_LEN): <bos> words <eos> <pad>...

    "" gives <bos> <eos> <pad>..., the unconditional prompt for CFG. A word whose id is not below
    `vocab_size` (the encoder's table; the gate word for the shipped encoders) is <unk>.
    """
    ids = torch.full((len(prompts), MAX_LEN), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) + 2 > MAX_LEN:
            raise ValueError(f"prompt has {len(words)} words, more than {MAX_LEN - 2}: {prompt!r}")
        seq = [BOS_ID] + [WORD_TO_ID.get(w, UNK_ID) for w in words] + [EOS_ID]
        seq = [i if i < vocab_size else UNK_ID for i in seq]
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids


def loose_caption(spec, rng):
    """A true but incomplete caption of the spec, like web alt-text: drops the count ("some red
    circles", "red circles"), a colour ("a circle"), the relation ("a red circle and a blue square"),
    or one of two objects. Every loose caption is still true of the image."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    objs = spec["objects"]

    def name(o, color=True):
        return f"{o['color']} {o['shape']}" if color else o["shape"]

    category = spec["category"]
    if category in ("single_object", "colors"):
        return f"a {objs[0]['shape']}"
    if category == "counting":
        plural = name(objs[0], color=bool(rng.integers(2))) + "s"
        return f"some {plural}" if rng.integers(2) else plural
    keep_color = rng.integers(2, size=2).astype(bool)
    a, b = (name(o, c) for o, c in zip(objs, keep_color))
    choice = rng.integers(3)
    if choice == 0:  # one of the two objects
        return f"a {a}" if rng.integers(2) else f"a {b}"
    if choice == 1 or category != "position":  # both, without the relation; or colours dropped
        return f"a {a} and a {b}"
    return f"a {b} and a {a}"  # the relation's order does not hold in an "and"


# ----------------------------------------------------------------------------
# Renderer


def shape_mask(shape, side):
    """Boolean (side, side) mask of a shape filling a side x side box.

    Pixels are in when their centre is inside the ideal shape, with no
    anti-aliasing: flat colours keep the nearest-colour checker exact.
    """
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    half = side / 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (xx - half) ** 2 + (yy - half) ** 2 <= half * half
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return np.abs(xx - half) <= half * yy / side
    raise ValueError(f"unknown shape {shape!r}")


def relation_holds(centroid_a, centroid_b, relation, size):
    """Does object a stand in `relation` to object b? Centroids are (x, y), y down."""
    margin = POSITION_MARGIN * size
    dx = centroid_b[0] - centroid_a[0]  # > 0 when a is left of b
    dy = centroid_b[1] - centroid_a[1]  # > 0 when a is above b
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > margin


def _objects_to_draw(spec):
    objs = [(o["shape"], o["color"]) for o in spec["objects"]]
    return objs * spec["count"] if spec["category"] == "counting" else objs


def render(spec, size=32, rng=None):
    """Draw the spec's objects on a black canvas -> uint8 (size, size, 3).

    Positions and sides are random (rng: np.random.Generator, int seed, or None
    for seed 0) but always honour the spec: exact count, no overlaps, and for
    `position` the relation holds on the drawn centroids, on the dominant axis.
    """
    if size < 32:
        raise ValueError(f"size {size} < 32: objects under 7 px cannot be told apart by fill ratio")
    rng = np.random.default_rng(0 if rng is None else rng) if not isinstance(rng, np.random.Generator) else rng
    scale = size / 32
    lo, hi = round(OBJ_MIN * scale), round(OBJ_MAX * scale)
    gap, border = round(OBJ_GAP * scale), round(BORDER * scale)
    objs = _objects_to_draw(spec)

    # Rejection sampling: place objects one by one; if one does not fit, or the
    # finished layout breaks the relation, start the layout over.
    for _ in range(1000):
        boxes = []  # (x, y, side, mask)
        for shape, _color in objs:
            for _ in range(100):
                side = int(rng.integers(lo, hi + 1))
                x = int(rng.integers(border, size - border - side + 1))
                y = int(rng.integers(border, size - border - side + 1))
                # Separated iff the gap-widened boxes do not intersect on some axis.
                if all(
                    x + side + gap <= bx or bx + bs + gap <= x or y + side + gap <= by or by + bs + gap <= y
                    for bx, by, bs, _ in boxes
                ):
                    boxes.append((x, y, side, shape_mask(shape, side)))
                    break
            else:
                break  # this object found no room: restart the whole layout
        if len(boxes) < len(objs):
            continue
        if spec["category"] == "position":
            # Same centroid definition as detect(), so the checker must agree.
            (ca, cb) = [(x + m.nonzero()[1].mean(), y + m.nonzero()[0].mean()) for x, y, _, m in boxes]
            dx, dy = abs(cb[0] - ca[0]), abs(cb[1] - ca[1])
            on_x_axis = spec["relation"] in ("left of", "right of")
            dominant = dx > dy if on_x_axis else dy > dx  # a clear picture of the relation
            if not (relation_holds(ca, cb, spec["relation"], size) and dominant):
                continue
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = BACKGROUND
        for (x, y, side, m), (_shape, color) in zip(boxes, objs):
            canvas[y : y + side, x : x + side][m] = PALETTE[color]
        return canvas
    raise RuntimeError(f"could not lay out {caption(spec)!r} on a {size}px canvas")


def to_tensor(images):
    """uint8 (B, H, W, 3) numpy -> float tensor (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------
# Training stream and evaluation prompt set


def swapped_caption(spec):
    """The two colours exchanged ("a blue circle and a red square" under a red circle and a blue square):
    the binding error of web alt-text."""
    (a, b) = spec["objects"]
    return caption({**spec, "objects": [{**a, "color": b["color"]}, {**b, "color": a["color"]}]})


def can_swap(spec):
    """Two objects of different colours. Every such caption teaches binding (two_object and position
    captions have color_attr's form), so swapping color_attr's alone left it learned
    (measured: README, shapes world)."""
    objs = spec["objects"]
    return len(objs) == 2 and objs[0]["color"] != objs[1]["color"]


def stream(seed, batch_size, size=32, categories=None, loose=0.0, swap=0.0):
    """Endless, reproducible (images (B,3,H,W) in [-1,1], captions, specs) batches (pretraining only: a
    fraction `loose` of the captions are loose_caption()s, and a fraction `swap` of the captions of two
    differently coloured objects are swapped_caption()s)."""
    rng = np.random.default_rng(seed)
    categories = list(categories or CATEGORIES)

    def pretraining_caption(s):
        if loose and rng.random() < loose:
            return loose_caption(s, rng)
        if swap and can_swap(s) and rng.random() < swap:
            return swapped_caption(s)
        return caption(s)

    while True:
        specs = [random_spec(rng, categories[rng.integers(len(categories))]) for _ in range(batch_size)]
        images = np.stack([render(s, size, rng) for s in specs])
        yield to_tensor(images), [pretraining_caption(s) for s in specs], specs


def all_specs(category):
    """Every distinct spec of a category, in a fixed order."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    objs = [{"shape": s, "color": c} for s in SHAPES for c in COLORS]
    if category in ("single_object", "colors"):
        return [{"category": category, "objects": [o]} for o in objs]
    if category == "counting":
        return [{"category": category, "objects": [o], "count": n} for n in COUNT_WORDS for o in objs]
    specs = []
    for a, b in pairs:
        for ca in COLORS:
            for cb in COLORS:
                two = [{"shape": a, "color": ca}, {"shape": b, "color": cb}]
                if category == "two_object":
                    specs.append({"category": category, "objects": two})
                elif category == "color_attr" and ca != cb:
                    specs.append({"category": category, "objects": two})
                elif category == "position":
                    specs += [{"category": category, "objects": two, "relation": r} for r in RELATIONS]
    if not specs:
        raise ValueError(f"unknown category {category!r}")
    return specs


def make_eval_set(n_per_category, seed):
    """n prompts per category -> list of {"prompt", "spec"}.

    Categories with fewer distinct prompts than n (single_object and colors
    have 15) cycle through shuffled copies, so every distinct prompt appears
    equally often (+-1) instead of at the mercy of i.i.d. sampling.
    """
    rng = np.random.default_rng(seed)
    items = []
    for category in CATEGORIES:
        pool = all_specs(category)
        picked = []
        while len(picked) < n_per_category:
            picked += [pool[i] for i in rng.permutation(len(pool))]
        items += [{"prompt": caption(s), "spec": s} for s in picked[:n_per_category]]
    return items


EVAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval.jsonl")
EVAL_N_PER_CATEGORY, EVAL_SEED = 80, 0
# The dev set: where checkpoints, thresholds and hyper-parameters are chosen; the eval set is for the
# final measurement only. Its prompts avoid the eval set's where the category has enough distinct ones
# (two objects, position, colour attribution); single object, colours and counting have only 15, 15 and
# 45, all used by the eval set, so there the dev set differs in its seeds (below), not its prompts.
DEV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dev.jsonl")
DEV_N_PER_CATEGORY, DEV_SEED = 40, 1


def make_dev_set(n_per_category=DEV_N_PER_CATEGORY, seed=DEV_SEED, eval_items=None):
    eval_prompts = {r["prompt"] for r in (eval_items if eval_items is not None else load_eval_set())}
    rng = np.random.default_rng(seed)
    items = []
    for category in CATEGORIES:
        pool = all_specs(category)
        unseen = [s for s in pool if caption(s) not in eval_prompts]
        picked = [unseen[i] for i in rng.permutation(len(unseen))]  # first every unseen prompt, then repeats
        while len(picked) < n_per_category:
            picked += [pool[i] for i in rng.permutation(len(pool))]
        items += [{"prompt": caption(s), "spec": s} for s in picked[:n_per_category]]
    return items


def load_eval_set(path=EVAL_PATH):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_dev_set():
    return load_eval_set(DEV_PATH)


def first_per_category(records, n):
    """The first n records of each category, categories in CATEGORIES order (all of them for n = 0)."""
    return [r for c in CATEGORIES for r in [r for r in records if r["spec"]["category"] == c][: n or None]]


# ----------------------------------------------------------------------------


def preview(path, rows=6, cols=8, size=32, seed=0, upscale=4):
    """Save a grid of rendered samples (one row per category) and print captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pad = 2
    grid = np.full((rows * (size + pad) + pad, cols * (size + pad) + pad, 3), 64, dtype=np.uint8)
    for r in range(rows):
        category = CATEGORIES[r % len(CATEGORIES)]
        specs = [random_spec(rng, category) for _ in range(cols)]
        print(f"{category}: " + " | ".join(caption(s) for s in specs))
        for c, spec in enumerate(specs):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[y : y + size, x : x + size] = render(spec, size, rng)
    big = Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    files.save_image(big, path)  # atomic (files.write): a full disk keeps the last preview


def build_parser():
    parser = flags.Parser(description="The shapes world: renderer, prompts and exact checker.")
    parser.add_argument("--write-eval", metavar="PATH", help="write the fixed evaluation prompt set (jsonl)")
    parser.add_argument("--write-dev", metavar="PATH", help="write the dev prompt set (jsonl)")
    parser.add_argument("--preview", metavar="PATH", help="save a grid of rendered samples (png)")
    parser.add_argument("--n-per-category", type=flags.POSITIVE_INT, default=EVAL_N_PER_CATEGORY)
    parser.add_argument("--seed", type=flags.SEED, default=EVAL_SEED, help="a seed in [0, 2^63)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.write_eval or args.write_dev or args.preview):
        parser.error("nothing to do: pass --write-eval PATH, --write-dev PATH and/or --preview PATH")
    if args.write_dev:
        items = make_dev_set()
        files.write_text(args.write_dev, "".join(json.dumps(item) + "\n" for item in items))
        print(f"wrote {len(items)} prompts to {args.write_dev}")
    if args.write_eval:
        items = make_eval_set(args.n_per_category, args.seed)
        files.write_text(args.write_eval, "".join(json.dumps(item) + "\n" for item in items))
        print(f"wrote {len(items)} prompts to {args.write_eval}")
    if args.preview:
        preview(args.preview, seed=args.seed)
        print(f"wrote {args.preview}")


if __name__ == "__main__":
    files.script(main)  # Ctrl-C: one line
