"""
shapes/: the offline shapes world and our lab -- everything that is not the method itself.

    shapes/world.py      the world: specs, captions, the renderer, the dev / eval prompt sets
    shapes/checker.py    reads a generated image back into shapes and colours; the protocol's scores
    shapes/classifier.py the held-out diffusion classifier (SoftREPA eqs. 15-18) and train.py's validation
    shapes/pretrain.py   trains the tiny autoencoder, text encoder and denoisers (weights/ ships them)
    shapes/bench.py      what a step and a sample cost, on any family (real sizes: random weights)
    shapes/sweep.py, report.py, replicate.sh, gpu_jobs.py   the experiments of docs/ and their tables
    shapes/quickstart.sh, gated_demo.py   the quick start (README): a prompt and tokens on the gated base
    shapes/gated_eval.py the gated base of docs/gated/: untagged, a word or a vector in front, oracles, a file
    shapes/data/         the dev and eval prompt sets; shapes/weights/ the shipped tiny backbones

`import shapes` is the world (its names are re-exported here), so that the method's files say
`shapes.render(...)` and `shapes.CATEGORIES` without knowing this folder's layout.
"""

from shapes.world import *  # noqa: F401,F403  (the world's public names: render, caption, CATEGORIES, ...)
