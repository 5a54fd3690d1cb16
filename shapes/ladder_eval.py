"""ladder_eval.py: score one variant (base, a token / LoRA file, or a whole-denoiser folder) with the shapes
protocol, one JSON per variant, the base scored once and cached (docs/ladder/, issue 33 items 3-4).

    python -m shapes.ladder_eval --model tiny-sd3 --set eval --tokens runs/x/tokens.safetensors --out x.json
    python -m shapes.ladder_eval --model tiny-sd3 --set eval --pretrained runs/whole-seed0 --out w.json
    python -m shapes.ladder_eval --model tiny-sd3 --set overfit.jsonl --seeds 16 --tokens t.safetensors --out o.json

--set eval|dev: the protocol of eval.py --protocol (every prompt, 4 seeds fixed by rule,
checker.protocol_seeds), the same images eval.py would draw. --set FILE.jsonl: those prompts ({"prompt",
"spec"} a line) with sampling seeds 0..N-1 each (--seeds N), for the overfit check.
The JSON has eval.py's layout (model, set, prompts, samples_per_prompt, results, per_prompt with "base" and
the variant) plus the prompt texts, the per-image verdicts and the commit that made it, so a table can be
regenerated and its intervals recomputed by any rule (docs/ladder/analyse.py).
"""

import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files
import flags
import sampler
import shapes
import trained
from run import provenance
from shapes import backbones, checker


def records_and_seeds(which, seeds):
    if which in ("eval", "dev"):
        records = shapes.first_per_category(shapes.load_eval_set() if which == "eval" else shapes.load_dev_set(), 0)
        return records, checker.protocol_seeds(len(records), which=which), checker.SAMPLES_PER_PROMPT
    records = files.read_prompt_file(which)
    return records, [(i, s) for i in range(len(records)) for s in range(seeds)], seeds


def score(bb, records, pairs, samples, path=None, batch=128, model="tiny-sd3"):
    """Per-image verdicts (prompt-major) and eval.py's per-prompt groups for one variant."""
    images = []
    with trained.attached(bb, trained.read(path, model)) as handle:
        for i in range(0, len(pairs), batch):
            part = pairs[i : i + batch]
            prompts, seeds = [records[p]["prompt"] for p, _ in part], [s for _, s in part]
            images.append(sampler.generate(bb, prompts, seeds, handle=handle))
    return checker.verdicts_and_groups(torch.cat(images), records, pairs, samples)


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--set", default="eval", help="eval, dev, or a JSONL of prompts with specs")
    p.add_argument("--seeds", type=flags.POSITIVE_INT, default=16, help="JSONL sets: sampling seeds 0..N-1 per prompt")
    p.add_argument("--tokens", default=None, help="a token or LoRA file (train.py)")
    p.add_argument("--pretrained", default=None, help="a whole-denoiser folder (shapes.pretrain --out)")
    p.add_argument("--name", default=None, help="the variant's key (default: 'tokens PATH' / 'pretrained DIR')")
    p.add_argument("--base-cache", default=None, help="JSON of the base's scores on this set (made if missing)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=flags.THREADS, default=1, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records, pairs, samples = records_and_seeds(args.set, args.seeds)
    start = time.time()
    base_bb = backbones.load(args.model)
    if args.base_cache and os.path.exists(args.base_cache):
        base = files.read_json(args.base_cache, "the base's scores (shapes.ladder_eval --base-cache)")
    else:
        verdicts, groups = score(base_bb, records, pairs, samples, model=args.model)
        base = {"per_prompt": groups, "verdicts": verdicts, **provenance()}
        if args.base_cache:
            files.write_json(args.base_cache, base, indent=None)
    if args.pretrained:
        bb, name = backbones.load(args.model, pretrained=args.pretrained), args.name or f"pretrained {args.pretrained}"
    else:
        bb, name = base_bb, args.name or (f"tokens {args.tokens}" if args.tokens else "base")
    verdicts, groups = score(bb, records, pairs, samples, args.tokens, model=args.model)
    per_prompt = {"base": base["per_prompt"], name: groups}
    results = {
        "base": checker.ordered(checker.bootstrap_interval(base["per_prompt"])),
        name: checker.ordered(checker.bootstrap_interval(groups)),
        f"{name} - base": checker.paired_difference(groups, base["per_prompt"]),
    }
    out = {
        "model": args.model,
        "set": args.set,
        "prompts": len(records),
        "samples_per_prompt": samples,
        "prompt_texts": [r["prompt"] for r in records],
        "categories": [r["spec"]["category"] for r in records],
        "sampling_seeds": [s for _, s in pairs],
        "results": results,
        "per_prompt": per_prompt,
        "verdicts": {"base": base["verdicts"], name: verdicts},
        "base_commit": base["commit"],
        **provenance(),
        "wall_s": round(time.time() - start, 1),
        "threads": args.threads,
    }
    files.write_json(args.out, out, indent=None)
    for k, v in results.items():
        print(f"{k}: {checker.format_scores(v)}")
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
