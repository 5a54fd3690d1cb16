"""gated_demo.py: the quick start's picture and table (shapes/quickstart.sh). On the gated base (docs/gated/),
sample the same prompts with the same seeds four ways or more: untagged; with the gate word in front (what
the base can do when asked right); and untagged with each trained file attached. Print each one's score, its
paired difference against untagged, and its share of the word's gain; draw one grid.

    python -m shapes.gated_demo --trained prompt=runs/qs/prompt/prompt.safetensors \\
        tokens=runs/qs/tokens/tokens.safetensors --grid grid.png --json scores.json

Why this base: the shipped tiny-sd3 has no deficit a prefix can fix, so nothing trained at the text side
shows there. The gated base binds colours well only when one word stands before the prompt; trained on
untagged captions, which numbers find that mode by themselves is the question the grid answers.

Intervals: 95%, over the prompts (one training run each, so they say nothing of another training seed;
docs/gated/ has the 3-seed table). The share is (variant - untagged) / (tagged - untagged), its interval
the same prompt bootstrap of that ratio.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files
import flags
import sampler
import shapes
from run import provenance
from shapes import backbones, checker, gated_eval

GATED_BASE = os.path.join(backbones.WEIGHTS_DIR, "tiny-sd3-gated")


def named_file(text):
    """NAME=PATH -> (NAME, PATH), for --trained."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (for example prompt=runs/x/prompt.safetensors)")
    return name, path


def share_interval(variant, untagged, tagged, resamples=2000, seed=0):
    """(share, low, high) of the word's gain that `variant` recovers, on per-prompt groups {category: values}:
    the mean over categories of (variant - untagged), over the same of (tagged - untagged); the interval
    resamples the prompts within each category (as checker.bootstrap_interval does)."""
    rng = np.random.default_rng(seed)
    gains = {c: np.asarray(variant[c], float) - np.asarray(untagged[c], float) for c in variant}
    words = {c: np.asarray(tagged[c], float) - np.asarray(untagged[c], float) for c in variant}
    picks = {c: rng.integers(0, len(gains[c]), size=(resamples, len(gains[c]))) for c in gains}
    point = np.mean([g.mean() for g in gains.values()]) / np.mean([w.mean() for w in words.values()])
    boots = np.mean([gains[c][picks[c]].mean(axis=1) for c in gains], axis=0) / np.mean(
        [words[c][picks[c]].mean(axis=1) for c in gains], axis=0
    )
    return float(point), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained", default=GATED_BASE, help="the gated base's weights folder (default: the shipped one)"
    )
    p.add_argument("--set", default="dev", choices=["dev", "eval"])
    p.add_argument("--categories", nargs="+", default=["color_attr"], choices=shapes.CATEGORIES)
    p.add_argument("--trained", nargs="*", type=named_file, default=[], help="NAME=PATH: a trained file (train.py)")
    p.add_argument("--grid", default=None, help="PNG: the first --grid-prompts prompts x 2 seeds, every variant")
    p.add_argument("--grid-prompts", type=flags.POSITIVE_INT, default=4)
    p.add_argument("--json", default=None, help="the per-prompt values and per-image verdicts of every variant")
    p.add_argument("--threads", type=flags.THREADS, default=1, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for _, path in args.trained:  # every file checked before the base loads
        files.check_trained(path, "--trained")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    records, pairs, samples = gated_eval.protocol(args.set, args.categories)
    bb = backbones.load("tiny-sd3", pretrained=args.pretrained)
    # (row name, the grid's label, how it samples)
    variants = [
        ("untagged", "untagged", {}),
        (f"{shapes.GATE_WORD} + prompt", shapes.GATE_WORD, {"prefix": shapes.GATE_WORD}),
    ]
    variants += [(f"+ {name}", name, {"path": path}) for name, path in args.trained]
    images, verdicts, groups = {}, {}, {}
    for name, _, options in variants:
        images[name] = gated_eval.sample(bb, records, pairs, **options)
        verdicts[name], groups[name] = checker.verdicts_and_groups(images[name], records, pairs, samples)

    untagged, tagged = groups["untagged"]["mean"], groups[variants[1][0]]["mean"]
    print(f"gated base, {args.set} set, {' '.join(args.categories)}: {len(records)} prompts x {samples} seeds")
    print(f"{'':22s} {'score':>22s} {'vs untagged':>26s} {'share of the word gain':>26s}")
    table = {}
    for name, _, _ in variants:
        score, diff = checker.bootstrap_interval(groups[name])["mean"], None
        row = {"score": score}
        line = f"{name:22s} {score[0]:.3f} [{score[1]:.3f}, {score[2]:.3f}]"
        if name != "untagged":
            diff = checker.paired_difference(groups[name], groups["untagged"])["mean"]
            share = share_interval(groups[name]["mean"], untagged, tagged)
            row.update(difference=diff, share=share)
            line += (
                f"   {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]   {share[0]:.2f} [{share[1]:.2f}, {share[2]:.2f}]"
            )
        table[name] = row
        print(line)

    if args.grid:  # a row: one prompt, two seeds; a cell: that image under every variant
        shown = list(range(len(records)))[: args.grid_prompts]
        cells, labels = [], []
        for i in shown:
            for k in range(2):
                for name, label, _ in variants:
                    cells.append(images[name][samples * i + k])
                    labels.append(f"{label} {'ok' if verdicts[name][samples * i + k] else 'x'}")
        sampler.save_grid(
            torch.stack(cells),
            args.grid,
            per_cell=len(variants),
            columns=2,
            row_labels=[records[i]["prompt"] for i in shown],
            image_labels=labels,
        )
        print(f"wrote {args.grid}")
    if args.json:
        out = {
            "pretrained": args.pretrained,
            "set": args.set,
            "prompt_texts": [r["prompt"] for r in records],
            "categories": [r["spec"]["category"] for r in records],
            "sampling_seeds": [s for _, s in pairs],
            "trained": dict(args.trained),
            "table": table,
            "per_prompt": groups,
            "verdicts": verdicts,
            **provenance(),
            "wall_s": round(time.time() - start, 1),
        }
        files.write_json(args.json, out, indent=None)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    files.script(main)
