"""
sample.py: text-to-image sampling with or without soft tokens (SoftREPA sec. 4.1, AGSM sec. 4.1) --
the sampler every script uses (edit.py, eval.py, train.py's validation) and its command line.

The sampler loops are written out so that every step can be read:
  flow models (SD3, tiny-sd3): Euler on the probability-flow ODE dx/dsigma = v, sigma from 1 to 0,
      with SD3's time shift sigma' = shift sigma / (1 + (shift - 1) sigma);
  DDPM models (SD1.5, SDXL, tiny-sd1.5): DDIM (eta = 0) on SD's "leading" timestep spacing.
Classifier-free guidance: pred = uncond + cfg (cond - uncond), both branches in one batch. By default
both CFG branches use psi+ (SoftREPA; AGSM sec. 4 and Table 5 (ii)); `--neg-uncond` (uncond_set=1)
puts psi- on the unconditional branch (AGSM Table 5 (i)).

    python sample.py --model tiny-sd3 --prompt "a red circle above a blue square" --seed 0 1 2 3
    python sample.py --model tiny-sd3 --prompts shapes/data/eval.jsonl --tokens runs/x/tokens.safetensors --out out/x
    python sample.py --model sd3 --tokens ../shared/official-softrepa-tokens/sd3 --prompt "..." --compare

(Latency and memory with and without tokens: `python -m shapes.bench --sampling`.)
What it writes in --out: images/NNNNN.png (one per prompt and seed; with --compare also the plain
image of each), grid.png, and records.jsonl, one line per image, which eval.py reads:
    {"image": "images/00000.png", "prompt": ..., "seed": 0, "variant": "tokens" | "plain",
     "model": ..., "tokens": path | null, "token_set": "pos" | "ema_pos" | "tokens" | "softrepa" | "lora" | null,
     "uncond": "psi+" | "psi-" | "lora" | "none", "steps": ..., "cfg": ..., "size": ..., "spec": {...} (if given)}
"""

import argparse
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import families
import files
import flags
import models
import shapes
import softtokens

# -----------------------------------------------------------------------------
# The sampler core. edit.py uses the same pieces (predict, flow_sigmas, ddim_levels, ddim_step).


def flow_sigmas(steps, shift=1.0):
    """steps + 1 noise levels from 1 to 0 (FlowMatchEulerDiscreteScheduler with `shift`; FLUX-dev's dynamic
    shift is this with shift = e^mu, families.time_shift)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def ddim_timesteps(steps):
    """SD's "leading" spacing with steps_offset = 1: 981, 961, ..., 1 for 50 steps (descending)."""
    ratio = models.NUM_TRAIN_TIMESTEPS // steps
    return (torch.arange(steps) * ratio + 1).flip(0)


def ddim_levels(bb, steps):
    """(timesteps (steps,), alpha_bar levels (steps + 1,)). Step i takes x from level i to level i + 1
    with the denoiser called at timesteps[i]; the last level is alpha_bar[0] (SD's DDIM scheduler has
    set_alpha_to_one = False), so DDIM's final x is its clean-image estimate at t = 0."""
    abar = bb.alphas_cumprod.cpu()
    timesteps = ddim_timesteps(steps)
    return timesteps, torch.cat([abar[timesteps], abar[:1]])


def ddim_step(x, eps, abar_from, abar_to):
    """DDIM (eta = 0) from noise level abar_from to abar_to. Run with abar_to < abar_from it samples;
    with abar_to > abar_from it is DDIM inversion (edit.py). Both use the same two lines:
        x0  = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from)     the clean image eps implies
        x'  = sqrt(abar_to) x0 + sqrt(1 - abar_to) eps             re-noised to the new level"""
    x0 = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


def _rows(token_set, n):
    """A token-set choice for n rows: an int (every row) or a (n,) LongTensor; -1 = no tokens."""
    if torch.is_tensor(token_set):
        return token_set.long()
    return torch.full((n,), int(token_set), dtype=torch.long)


def predict(bb, x, timestep, cond, uncond, cfg, handle=None, uncond_set=None, cond_set=0):
    """One guided prediction. x (B, ...), cond / uncond: text kwargs with B rows each. With cfg == 1 the
    unconditional branch is skipped. With soft tokens attached (`handle`), cond_set is the token set of
    the conditional rows and uncond_set that of the unconditional rows (None: the same as cond_set):
    an int, or one per row as a (B,) LongTensor; -1 = no tokens (edit.py runs a source branch without
    tokens next to a target branch with them). A guidance-distilled family (FLUX-dev) runs one branch
    whatever cfg is: the cfg scale is its guidance input, and there is no unconditional branch."""
    B = x.shape[0]
    t = torch.full((B,), float(timestep), device=x.device)
    cond_rows = _rows(cond_set, B)
    distilled = bb.facts["guidance"] is not None
    if distilled and uncond_set is not None:
        raise SystemExit(
            f"--neg-uncond puts psi- on the unconditional branch, and {bb.name} has none: it is guidance-"
            f"distilled (one branch a step, the cfg scale is its guidance input); sample without it"
        )
    if cfg == 1.0 or distilled:
        choice = None if bool((cond_rows == 0).all()) else cond_rows
        with handle.rows(choice) if handle is not None else nullcontext():
            return models.denoise(bb, x, t, cond, guidance=cfg if distilled else None)
    uncond_rows = cond_rows if uncond_set is None else _rows(uncond_set, B)
    choice = torch.cat([uncond_rows, cond_rows])
    if bool((choice == 0).all()):
        choice = None  # every row uses the first set: the hooks' plain path
    both = models.cat_conds([uncond, cond])
    with handle.rows(choice) if handle is not None else nullcontext():
        pred_uncond, pred_cond = models.denoise(bb, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return pred_uncond + cfg * (pred_cond - pred_uncond)


def initial_noise(shape, seeds):
    """x_T for each seed, drawn on the CPU so that a seed gives the same image on every device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_loop(bb, x, cond, uncond, steps, cfg, handle=None, uncond_set=None, progress=False):
    """The sampler proper: from noise x at the highest noise level to clean latents."""
    facts = bb.facts
    loop = range(steps)
    if progress:
        from tqdm import tqdm

        loop = tqdm(loop, desc="sampling", leave=False)
    if facts["prediction"] == "flow":
        sigmas = flow_sigmas(steps, families.time_shift(facts, *x.shape[-2:]))  # SD3: 3; FLUX-dev: by size
        for i in loop:
            v = predict(bb, x, sigmas[i] * models.NUM_TRAIN_TIMESTEPS, cond, uncond, cfg, handle, uncond_set)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler step from sigma_i to sigma_i+1
    else:
        timesteps, levels = ddim_levels(bb, steps)
        for i in loop:
            eps = predict(bb, x, int(timesteps[i]), cond, uncond, cfg, handle, uncond_set)
            x = ddim_step(x, eps, levels[i], levels[i + 1])
    return x


@torch.no_grad()
def generate(bb, prompts, seeds, steps=None, cfg=None, size=None, handle=None, uncond_set=None, progress=False):
    """Images (B, 3, H, W) in [-1, 1] for `prompts`, one seed each (same seed -> same image)."""
    facts = bb.facts
    steps = steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if cfg is None else cfg
    x = initial_noise(models.latent_shape(bb, size), seeds).to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, list(prompts))
    uncond = models.encode_prompts(bb, [""] * len(prompts)) if facts["guidance"] is None else None  # distilled: none
    x = sample_loop(bb, x, cond, uncond, steps, cfg, handle, uncond_set, progress)
    files.check_finite(x, f"sampling {prompts[0]!r}")  # NaN or inf: one line, no image
    return models.decode_latents(bb, x).float().cpu()


def read_prompts(path):
    """[{"prompt": ..., "spec": ... (if any)}] from a text file (one prompt a line) or JSONL."""
    return files.read_prompt_file(path)


def check_prompts(name, prompts):
    """The tiny models read only the shapes world's words (shapes.VOCAB), at most shapes.MAX_LEN tokens."""
    if not models.is_shapes_world(name):
        return
    for prompt in prompts:
        problem = shapes.language_problem(prompt)
        if problem:
            raise SystemExit(f"prompt {prompt!r} is not in the shapes world's language ({problem})")


def save_image(image, path):
    from PIL import Image

    files.save_image(Image.fromarray(shapes.to_uint8(image)), path)


def save_grid(images, path, per_cell=1, columns=None, min_side=96):
    """A grid of images (N, 3, H, W); `per_cell` consecutive images sit side by side in one cell (the
    plain | tokens pair of --compare). Small images are enlarged (nearest) to be seen."""
    from PIL import Image

    n_cells = math.ceil(len(images) / per_cell)
    columns = columns or math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / columns)
    _, _, h, w = images.shape
    gap = 2
    cell_w = per_cell * w + (per_cell - 1) * (gap // 2)
    canvas = np.full((rows * (h + gap) - gap, columns * (cell_w + gap) - gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        cell, within = divmod(k, per_cell)
        r, c = divmod(cell, columns)
        y, x = r * (h + gap), c * (cell_w + gap) + within * (w + gap // 2)
        canvas[y : y + h, x : x + w] = shapes.to_uint8(image)
    scale = max(1, math.ceil(min_side / h))
    grid = Image.fromarray(canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    files.save_image(grid, path)


# -----------------------------------------------------------------------------
# The command line


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_backbone_flags(p)
    p.add_argument("--tokens", default=None, help="soft-token file (softtokens.save) or a folder of SoftREPA .pth")
    p.add_argument("--no-tokens", action="store_true", help="sample the plain model (ignore --tokens)")
    p.add_argument("--ema", action="store_true", help="pair-token files: sample with the EMA copies")
    p.add_argument("--neg-uncond", action="store_true", help="psi- on the unconditional branch (AGSM Table 5 (i))")
    p.add_argument("--compare", action="store_true", help="also sample without tokens, side by side in the grid")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts", default=None, help='text file (a prompt a line) or JSONL with a "prompt" field')
    p.add_argument(
        "--seed", type=flags.SEED, nargs="+", default=[0], help="one image per prompt and seed, each in [0, 2^63)"
    )
    p.add_argument("--steps", type=flags.POSITIVE_INT, default=None, help="default: the family's (models.FAMILIES)")
    p.add_argument(
        "--cfg",
        type=flags.NON_NEGATIVE_FLOAT,
        default=None,
        help="default: the family's; 1: the conditional prediction alone, 0: the unconditional alone "
        "(guidance-distilled FLUX: its guidance input)",
    )
    p.add_argument(
        "--size", type=flags.POSITIVE_INT, default=None, help="image side in pixels (default: the family's)"
    )
    p.add_argument("--batch", type=flags.POSITIVE_INT, default=16, help="images per denoiser batch")
    p.add_argument("--out", default="out/sample")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Every one-line error that needs no model, before the model is loaded."""
    models.check_flags(args)
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("give the prompts with exactly one of --prompt TEXT or --prompts FILE")
    if args.no_tokens:
        args.tokens = None
    if args.tokens is None and (args.ema or args.neg_uncond or args.compare):
        raise SystemExit("--ema, --neg-uncond and --compare act on soft tokens: pass --tokens FILE")
    if args.tokens is not None and not os.path.exists(args.tokens):
        raise SystemExit(f"no token file or folder at {args.tokens}")
    if args.neg_uncond and models.FAMILIES[args.model]["guidance"] is not None:  # checked again in predict
        raise SystemExit(
            f"--neg-uncond puts psi- on the unconditional branch, and {args.model} has none: it is "
            f"guidance-distilled (one branch per step); drop --neg-uncond"
        )
    args.size = args.size or models.FAMILIES[args.model]["size"]
    families.check_size(args.model, args.size)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    facts = models.FAMILIES[args.model]
    steps = args.steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if args.cfg is None else args.cfg
    items = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(args.prompts)
    check_prompts(args.model, [item["prompt"] for item in items])
    sets, info = (None, dict(token_set=None, blocks=None))
    if args.tokens is not None:
        sets, info = softtokens.read_tokens(args.tokens, args.model, args.ema, args.neg_uncond)
    files.check_writable(args.out)  # before the work: a read-only --out must not lose the images

    bb = models.from_flags(args)
    families.check_size(args.model, args.size, bb=bb)  # the loaded model's positional table
    uncond_set = 1 if args.neg_uncond else None
    jobs = [(item, seed) for item in items for seed in args.seed]
    variants = (["plain", "tokens"] if args.compare else ["tokens"]) if sets is not None else ["plain"]
    images = {}
    for variant in variants:
        with softtokens.attached(bb, sets if variant == "tokens" else None, info["blocks"]) as handle:
            out = []
            for start in tqdm(range(0, len(jobs), args.batch), desc=f"sampling ({variant})"):
                part = jobs[start : start + args.batch]
                out.append(
                    generate(
                        bb,
                        [it["prompt"] for it, _ in part],
                        [s for _, s in part],
                        steps,
                        cfg,
                        args.size,
                        handle,
                        uncond_set if variant == "tokens" else None,
                    )
                )
        images[variant] = torch.cat(out)

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    records, ordered = [], []
    for k, (item, seed) in enumerate(jobs):
        for variant in variants:
            suffix = f"-{variant}" if len(variants) > 1 else ""
            name = os.path.join("images", f"{k:05d}{suffix}.png")
            save_image(images[variant][k], os.path.join(args.out, name))
            ordered.append(images[variant][k])
            with_tokens = variant == "tokens"
            record = dict(
                image=name,
                prompt=item["prompt"],
                seed=seed,
                variant=variant,
                model=args.model,
                tokens=args.tokens if with_tokens else None,
                token_set=info["token_set"] if with_tokens else None,
                uncond=("psi-" if args.neg_uncond else "lora" if info["token_set"] == "lora" else "psi+")
                if with_tokens
                else "none",
                steps=steps,
                cfg=cfg,
                size=args.size,
                random_init=args.random_init,
            )
            if "spec" in item:
                record["spec"] = item["spec"]
            records.append(record)
    files.write_text(os.path.join(args.out, "records.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    save_grid(torch.stack(ordered), os.path.join(args.out, "grid.png"), per_cell=len(variants))
    print(f"{len(records)} images, grid.png and records.jsonl in {args.out}")
    return records


if __name__ == "__main__":
    main()
