"""
shapes/counter.py: the shapes world's object counter -- the detector of SoftREPA's counting loss
(appendix D; losses.py, "the counting loss") where the paper used YOLOv8 on COCO-trained SD3.

The counter itself (checker.ShapesCounter) is a small CNN that says, for each shape, how many of it
an image holds (0-4); its soft count has a gradient, unlike the checker's exact count. This script
trains it on renders of the world's own specs; half of each training batch is blurred and noised,
because the counting loss shows it one-step predictions x0_hat decoded by the VAE, which are blurry at
high noise levels.

    python -m shapes.counter                       # train (2 min on 2 cores), write weights/counter.safetensors
    python -m shapes.counter --check               # its accuracy on held-out renders (docs/other-arms.md)
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

import files
import flags
from shapes import world
from shapes.checker import COUNTER_WEIGHTS, ShapesCounter, load_counter


def shape_counts(spec):
    """(shapes,) the number of objects of each shape a spec draws."""
    drawn = world._objects_to_draw(spec)
    return [sum(shape == s for shape, _ in drawn) for s in world.SHAPES]


def renders(n, seed):
    """n random scenes of every category: images (n, 3, 32, 32) in [-1, 1] and counts (n, shapes)."""
    rng = np.random.default_rng(seed)
    specs = [world.random_spec(rng) for _ in range(n)]
    images = world.to_tensor(np.stack([world.render(s, 32, rng) for s in specs]))
    return images, torch.tensor([shape_counts(s) for s in specs])


def degrade(images, generator):
    """Blur and noise of random strength: what a decoded one-step prediction looks like at high t."""
    blur = torch.rand(len(images), 1, 1, 1, generator=generator)
    smooth = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (1 - blur) * images + blur * smooth + 0.3 * blur * torch.randn(images.shape, generator=generator)
    return noisy.clamp(-1, 1)


def accuracy(model, images, counts, batch=512):
    """Fraction of images whose count of every shape is right (argmax), and per-shape accuracy."""
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + batch]).argmax(-1) for i in range(0, len(images), batch)])
    right = predicted == counts
    return float(right.all(1).float().mean()), float(right.float().mean())


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report the shipped counter's held-out accuracy")
    p.add_argument("--n-train", type=flags.POSITIVE_INT, default=20000, help="training scenes")
    p.add_argument("--steps", type=flags.POSITIVE_INT, default=3000)
    p.add_argument("--out", default=COUNTER_WEIGHTS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    held_out = renders(2000, seed=10**6)  # another seed than any training scene
    if not args.check:
        from safetensors.torch import save_file
        from tqdm import tqdm

        images, counts = renders(args.n_train, seed=0)
        model, g = ShapesCounter(), torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
        for _ in tqdm(range(args.steps), desc="counter"):
            idx = torch.randint(0, len(images), (128,), generator=g)
            x = images[idx]
            x = torch.cat([x[:64], degrade(x[64:], g)])  # half clean, half blurred and noised
            loss = F.cross_entropy(model(x).flatten(0, 1), counts[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        files.write(args.out, lambda tmp: save_file(weights, tmp))  # atomic: a full disk keeps the shipped one
    model = load_counter(args.out)
    exact, per_shape = accuracy(model, *held_out)
    g = torch.Generator().manual_seed(1)
    blurred, _ = accuracy(model, degrade(held_out[0], g), held_out[1])
    result = dict(
        heldout_renders=len(held_out[0]), all_shapes_exact=exact, per_shape=per_shape, degraded_all_exact=blurred
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
