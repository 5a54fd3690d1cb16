"""
shapes/pairs.py: the shapes world as training data, the endless stream that `--data shapes` names.

train.py chooses it (the method's data.py knows no world of its own): a stream is a data source whose
batch is drawn, not read, so data.get_batch calls the source's `draw(step, rank, batch)`. As for every
source, what a batch holds is a function of (seed, step, rank) alone: a resumed run draws exactly the
images an uninterrupted one would have drawn.

    shapes                  the six categories, precise captions
    shapes:two_object,..    those categories only
    shapes-swapped[:CAT,..] the colours of two differently coloured objects exchanged in their caption:
                            the capacity control (docs/shapes-results.md)
"""

import functools

import numpy as np

from shapes import world

NAMES = ("shapes", "shapes-swapped")


def is_stream(spec):
    """Whether `--data spec` names the shapes stream (and not a folder or file of pairs)."""
    return spec is not None and spec.split(":")[0] in NAMES


def open_stream(spec, size, seed):
    """The data source of `--data spec` (data.get_batch reads it): a dict whose `draw` makes a batch."""
    name, _, listed = spec.partition(":")
    categories = [c for c in listed.split(",") if c] or list(world.CATEGORIES)
    unknown = [c for c in categories if c not in world.CATEGORIES]
    if unknown:
        raise SystemExit(
            f"--data {spec}: unknown shapes categor{'ies' if len(unknown) > 1 else 'y'} "
            f"{', '.join(unknown)}; choose from {', '.join(world.CATEGORIES)}"
        )
    if size < 32:  # world.render's floor: smaller objects cannot be told apart by their fill
        raise SystemExit(f"--size {size}: the shapes world draws its images at 32 px or more; pass --size 32")
    draw = functools.partial(draw_batch, seed=seed, size=size, categories=categories, swapped=name == "shapes-swapped")
    return dict(kind="stream", spec=spec, draw=draw)


def draw_batch(step, rank, batch, seed, size, categories, swapped):
    """`batch` rendered images (B, 3, size, size) in [-1, 1] and their captions, from the generator
    seeded by (seed, step, rank)."""
    rng = np.random.default_rng([seed, step, rank])
    specs = [world.random_spec(rng, categories[rng.integers(len(categories))]) for _ in range(batch)]
    images = np.stack([world.render(spec, size, rng) for spec in specs])
    # shapes-swapped: every caption of two differently coloured objects names the colours the other way
    # round (world.swapped_caption), a control that tells what tokens can *un*learn
    caption = world.swapped_caption if swapped else world.caption
    captions = [caption(spec) if world.can_swap(spec) else world.caption(spec) for spec in specs]
    return dict(images=world.to_tensor(images), captions=captions)


def check_vocabulary(records, path):
    """The shapes world's text encoder reads only its own words (world.VOCAB), at most world.MAX_LEN - 2
    of them: a caption of a file source outside that fails here, on the first pass, not mid-run."""
    for image, captions in records:
        for caption in captions:
            problem = world.language_problem(caption)
            if problem:
                raise SystemExit(
                    f"--data {path}: the caption {caption!r} of {image} is not in the shapes "
                    f"world's language ({problem}); tiny models read only the shapes world's words"
                )
