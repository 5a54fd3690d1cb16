"""reach.py: can what was trained reproduce the gate word's effect? The distillation objective of
train.py --distill-prefix, measured on held-out pairs for each trained file of docs/gated/:

    error(file) = mean || f_file(x_t, t, c) - f_base(x_t, t, "exactly " + c) ||^2

with f_base the frozen gated base and nothing attached, against the same error with nothing attached
(f_base(x_t, t, c): what the untagged prompt already gives). Held-out pairs: the shapes stream's precise
captions from a seed no training run used (shapes.stream(10**6)), 64 batches of 4, one t ~ U(0, 1) and one
noise per image, drawn from a fixed generator (the same draws for every file).

    python docs/gated/reach.py --threads 1 > docs/gated/reach.txt       # the first gated base
    python docs/gated/reach.py --base runs/gated/base3/weights --arms runs/gated/narrow-arms \
        > docs/gated/narrow/reach.txt
"""

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import models  # noqa: E402
import shapes  # noqa: E402
import trained  # noqa: E402
from run import provenance  # noqa: E402
from shapes import backbones  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def held_out(bb, batches, batch=4, seed=10**6):
    data, g = shapes.stream(seed, batch), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        images, captions, _ = next(data)
        x0 = models.encode_images(bb, images, mode=True)
        noise = torch.randn(x0.shape, generator=g)
        x_t, timesteps = models.add_noise(bb, x0, noise, torch.rand(len(x0), generator=g))
        teacher = models.denoise(
            bb, x_t, timesteps, models.encode_prompts(bb, [f"{shapes.GATE_WORD} {c}" for c in captions])
        )
        out.append((x_t, timesteps, captions, teacher))
    return out


@torch.no_grad()
def error(bb, pairs, path=None):
    total = 0.0
    with trained.attached(bb, trained.read(path, bb.name)) as handle:
        for x_t, timesteps, captions, teacher in pairs:
            cond = models.encode_prompts(bb, captions)
            with handle.rows(None) if handle is not None else torch.no_grad():
                pred = models.denoise(bb, x_t, timesteps, cond)
            total += (pred - teacher).pow(2).mean().item()
    return total / len(pairs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--base", default=os.path.join(ROOT, "runs/gated/base2/weights"), help="the gated base's folder")
    p.add_argument("--arms", default=os.path.join(ROOT, "runs/gated/arms"), help="the arms' run folders")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = backbones.load("tiny-sd3", pretrained=args.base)
    pairs = held_out(bb, args.batches)
    print(f"# reach.py at {provenance()}; {args.batches} held-out batches of 4")
    print(f"nothing attached: {error(bb, pairs):.5f}")
    for pattern in ("tokens-distill", "prompt-distill", "tokens-dsm", "tokens64-dsm", "prompt-dsm"):
        for path in sorted(glob.glob(os.path.join(args.arms, f"{pattern}-seed*/*.safetensors"))):
            run = os.path.basename(os.path.dirname(path))
            print(f"{run}: {error(bb, pairs, path):.5f}")


if __name__ == "__main__":
    main()
