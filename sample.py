"""
sample.py: text-to-image sampling with or without soft tokens (SoftREPA sec. 4.1, AGSM sec. 4.1) -- the
command line. The sampler itself (flow Euler and DDIM written out, classifier-free guidance with per-row
tokens) is sampler.py, which edit.py, eval.py and train.py's validation use too. A trained file (tokens or
LoRA) attaches as it was trained (trained.py). By default both CFG branches use psi+ (SoftREPA; AGSM sec. 4
and Table 5 (ii)); `--neg-uncond` puts psi- on the unconditional branch (AGSM Table 5 (i)).

    python sample.py --model tiny-sd3 --prompt "a red circle above a blue square" --seed 0 1 2 3
    python sample.py --model tiny-sd3 --prompts shapes/data/eval.jsonl --tokens runs/x/tokens.safetensors --out out/x
    python sample.py --model sd3 --tokens ../shared/official-softrepa-tokens/sd3 --prompt "..." --compare
    python sample.py --model sd3 --prompts GenEval2/geneval2_data.jsonl --out out/sd3-geneval2   # eval.py soft-tifa

(Latency and memory with and without tokens: `python -m shapes.bench --sampling`.)
What it writes in --out: images/NNNNN.png (one per prompt and seed; with --compare also the plain
image of each), grid.png, and records.jsonl, one line per image, which eval.py reads:
    {"image": "images/00000.png", "prompt": ..., "seed": 0, "variant": "tokens" | "plain",
     "model": ..., "tokens": path | null, "token_set": "pos" | "ema_pos" | "tokens" | "softrepa" | "lora" | null,
     "uncond": "psi+" | "psi-" | "lora" | "none", "steps": ..., "cfg": ..., "size": ..., "spec": {...} (if given)}
"""

import argparse
import json
import os

import torch
from tqdm import tqdm

import families
import files
import flags
import models
import sampler
import trained
from shapes import backbones

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
    p.add_argument("--steps", type=flags.POSITIVE_INT, default=None, help="default: the family's (families.py)")
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
    models.check_backbone_flags(args)
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("give the prompts with exactly one of --prompt TEXT or --prompts FILE")
    if args.no_tokens:
        args.tokens = None
    if args.tokens is None and (args.ema or args.neg_uncond or args.compare):
        raise SystemExit("--ema, --neg-uncond and --compare act on soft tokens: pass --tokens FILE")
    if args.tokens is not None and not os.path.exists(args.tokens):
        raise SystemExit(f"no token file or folder at {args.tokens}")
    if args.neg_uncond and families.FAMILIES[args.model]["guidance"] is not None:  # checked again in predict
        raise SystemExit(
            f"--neg-uncond puts psi- on the unconditional branch, and {args.model} has none: it is "
            f"guidance-distilled (one branch per step); drop --neg-uncond"
        )
    args.size = args.size or families.FAMILIES[args.model]["size"]
    families.check_size(args.model, args.size)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    facts = families.FAMILIES[args.model]
    steps = args.steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if args.cfg is None else args.cfg
    items = [{"prompt": args.prompt}] if args.prompt is not None else files.read_prompt_file(args.prompts)
    backbones.check_prompts(args.model, [item["prompt"] for item in items])
    loaded = trained.read(args.tokens, args.model, args.ema, args.neg_uncond)  # None without --tokens
    files.check_writable(args.out)  # before the work: a read-only --out must not lose the images

    bb = models.from_flags(args, shapes_world=backbones.load)
    families.check_size(args.model, args.size, bb=bb)  # the loaded model's positional table
    uncond_set = 1 if args.neg_uncond else None
    jobs = [(item, seed) for item in items for seed in args.seed]
    variants = (["plain", "tokens"] if args.compare else ["tokens"]) if loaded is not None else ["plain"]
    images = {}
    for variant in variants:
        with trained.attached(bb, loaded if variant == "tokens" else None) as handle:
            out = []
            for start in tqdm(range(0, len(jobs), args.batch), desc=f"sampling ({variant})"):
                part = jobs[start : start + args.batch]
                out.append(
                    sampler.generate(
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
            sampler.save_image(images[variant][k], os.path.join(args.out, name))
            ordered.append(images[variant][k])
            with_tokens = variant == "tokens"
            record = dict(
                image=name,
                prompt=item["prompt"],
                seed=seed,
                variant=variant,
                model=args.model,
                tokens=args.tokens if with_tokens else None,
                token_set=loaded.token_set if with_tokens else None,
                uncond=("psi-" if args.neg_uncond else "lora" if loaded.token_set == "lora" else "psi+")
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
    sampler.save_grid(torch.stack(ordered), os.path.join(args.out, "grid.png"), per_cell=len(variants))
    print(f"{len(records)} images, grid.png and records.jsonl in {args.out}")
    return records


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
