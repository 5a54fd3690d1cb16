"""
shapes/classifier.py: the held-out diffusion classifier (SoftREPA eqs. 15-18), the alignment measure both
papers report beside the image scores: does the true caption of a held-out image give a lower denoising
error than K - 1 captions that are false of it?

Under an optimal denoiser, log p(x|y) is, up to a constant, minus the weighted denoising error
integrated over t (eq. 16), so the caption with the lowest error is the maximum-likelihood caption. We
estimate the error at a few fixed noise levels with one fixed eps per (image, level), shared by all
candidate captions of that image (like the papers' shared t and eps per row), so only the caption
differs between candidates. Shapes-world records are rendered afresh and get hard negatives from their
own category; real records (an "image" path and its "captions") take other records' captions.
"""

import os
from contextlib import nullcontext

import numpy as np
import torch

import data
import losses
import models
import sampler
import shapes
from shapes import checker

CLASSIFIER_NOISE_LEVELS = (0.25, 0.5, 0.75)


STRICT = {"single_object": "colors", "two_object": "color_attr"}  # colour-exact versions of the rules


def ground_truth_images(records, seed=0, size=32):
    """uint8 (size, size, 3) images: a shapes record (with "spec") is rendered, its layout drawn from the
    generator (seed, i); any other record's "image" file is resized and centre-cropped (data.read_image)."""
    out = []
    for i, r in enumerate(records):
        if "spec" in r:
            out.append(shapes.render(r["spec"], size, np.random.default_rng([seed, i])))
            continue
        out.append(data.read_image(r["image"], size, fix="pass records whose images exist"))
    return out


def distractors(records, i, image, k, rng):
    """k captions that are false of record i's image. Shapes records: hard negatives from its own category,
    sharing its template and differing in colour, shape, count or relation; a caption the image also
    satisfies (colour-exact check: "b and a" for "a and b", a second relation that also holds) is skipped.
    Other records: the prompts of k other records that are none of this image's "captions"."""
    record = records[i]
    if "spec" not in record:
        own = set(record.get("captions") or [record["prompt"]])
        pool = [records[j]["prompt"] for j in rng.permutation(len(records)) if j != i]
        texts = [t for t in dict.fromkeys(pool) if t not in own]
    else:
        specs = shapes.all_specs(record["spec"]["category"])
        strict = lambda spec: {**spec, "category": STRICT.get(spec["category"], spec["category"])}  # noqa: E731
        texts = (
            shapes.caption(specs[j])
            for j in rng.permutation(len(specs))
            if shapes.caption(specs[j]) != record["prompt"] and not checker.check(image, strict(specs[j]))
        )
    out = []
    for text in texts:
        if text not in out:
            out.append(text)
        if len(out) == k:
            return out
    raise ValueError(f"only {len(out)} distractors for {record['prompt']!r}: lower n_candidates")


@torch.no_grad()
def classifier_errors(
    bb, records, n_candidates=4, seed=0, handle=None, noise_levels=CLASSIFIER_NOISE_LEVELS, batch=256
):
    """(R, K) denoising errors averaged over the noise levels, column 0 the record's true caption;
    and the K captions of each record."""
    images = ground_truth_images(records, seed, bb.facts["size"])
    captions = [
        [r["prompt"]] + distractors(records, i, im, n_candidates - 1, np.random.default_rng([seed, i, 1]))
        for i, (r, im) in enumerate(zip(records, images))
    ]
    unique = sorted({c for row in captions for c in row})
    cond_all = models.cat_conds([models.encode_prompts(bb, unique[i : i + 64]) for i in range(0, len(unique), 64)])
    # the posterior mean (mode=True): the classifier's verdict must not depend on a random draw of the VAE
    x0 = torch.cat(
        [
            models.encode_images(bb, shapes.to_tensor(np.stack(images[i : i + 16])), mode=True)
            for i in range(0, len(images), 16)
        ]
    )
    R, L, K, device = len(records), len(noise_levels), n_candidates, bb.device
    noise = torch.randn((R * L,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x0)
    x0 = x0.repeat_interleave(L, dim=0)  # row r * L + l
    u = torch.tensor(noise_levels, dtype=torch.float32).repeat(R).to(device)
    x_t, timesteps = models.add_noise(bb, x0, noise, u)
    target = models.target(bb, x0, noise)
    position = {c: j for j, c in enumerate(unique)}
    image_row = torch.arange(R * L).repeat_interleave(K)  # pair (r, l, k)
    caption_row = torch.tensor([position[c] for row in captions for _ in range(L) for c in row])
    errors = torch.empty(R * L * K)
    with handle.rows(None) if handle is not None else nullcontext():  # every row: set 0
        for s in range(0, R * L * K, batch):
            rows, caps = image_row[s : s + batch].to(device), caption_row[s : s + batch].to(device)
            pred = models.denoise(bb, x_t[rows], timesteps[rows], models.index_cond(cond_all, caps))
            # the per-element mean squared error of losses.pair_errors
            errors[s : s + batch] = (pred.float() - target[rows].float()).pow(2).flatten(1).mean(1).cpu()
    return errors.view(R, L, K).mean(1), captions


def classifier_accuracy(
    bb, records, n_candidates=4, seed=0, handle=None, noise_levels=CLASSIFIER_NOISE_LEVELS, batch=256
):
    """Fraction of records whose true caption has a strictly lower error than all K-1 distractors, by
    the rule of the in-batch accuracy (losses.strictly_lowest: a tie counts as wrong, so a text-blind
    model scores 0, not 1/K by the luck of argmin)."""
    errors, _ = classifier_errors(bb, records, n_candidates, seed, handle, noise_levels, batch)
    return float(losses.strictly_lowest(errors[:, 0], errors[:, 1:]).float().mean())


# -----------------------------------------------------------------------------
# train.py's validation (--val-every): a fixed prompt grid sampled with the current tokens, the shapes
# checker's scores of it (tiny-*), and the held-out accuracy above.

DEV_PROMPTS = [r["prompt"] for r in shapes.load_dev_set()[::30][:8]]  # fixed prompts of the token movement
VAL_PROMPTS = [
    "a photo of three apples on a wooden table",
    "a red bus parked next to a blue car",
    "a cat sitting to the left of a dog",
    "two people riding bicycles down a city street",
]


def validate(bb, handle, args, step):
    """Sample a fixed prompt grid with the current tokens (saved as an image); tiny-*: the shapes checker's
    scores of those samples; and classifier.classifier_accuracy on held-out pairs."""
    tiny = models.is_shapes_world(bb.name)
    if tiny:  # the first val_n prompts of every category of the DEV set (the eval set is for final numbers)
        records = shapes.first_per_category(shapes.load_dev_set(), args.val_n)
        prompts = [r["prompt"] for r in records]
    else:
        records = (
            [
                {"image": path, "prompt": caps[0], "captions": caps}
                for path, caps in data.read_records(args.val_data, "val")[: 6 * args.val_n]
            ]
            if args.val_data
            else []
        )
        prompts = VAL_PROMPTS
    images = torch.cat(
        [
            sampler.generate(
                bb, prompts[i : i + 16], range(i, i + len(prompts[i : i + 16])), args.val_steps, handle=handle
            )
            for i in range(0, len(prompts), 16)
        ]
    )
    os.makedirs(os.path.join(args.out, "val"), exist_ok=True)
    sampler.save_grid(
        images,
        os.path.join(args.out, "val", f"step{step:07d}.png"),
        columns=args.val_n if tiny else len(prompts),
        min_side=256,
    )
    result = {}
    if tiny:
        result.update({f"score_{k}": v for k, v in checker.score(images, [r["spec"] for r in records]).items()})
    if records:
        # the held-out diffusion-classifier accuracy (SoftREPA eqs. 15-18)
        result["heldout_acc"] = classifier_accuracy(bb, records, n_candidates=4, seed=0, handle=handle)
        # (tiny-*: the records are dev-set prompts, rendered afresh: held out from the training stream)
    return result
