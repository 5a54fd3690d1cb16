"""A hyper-parameter sweep on the shapes world's dev set, one CSV row per run.

The knobs both papers ablate (SoftREPA Fig. 6 and Table 10: the number of tokens, the token layers,
τ; AGSM Tables 6 and 12: γ±, the layers, the steps), plus lr, varied one at a time around the family's
defaults (recipe.py), as the papers' ablations do. Every run is train.py with one flag
changed; then one eval.py --protocol dev scores the base and every run's tokens on the same prompts and
seeds, so each row carries its paired difference against the base with its 95% interval.

    python -m shapes.sweep --model tiny-sd3 --loss softrepa agsm --steps 2000 --vary tau=0.3,1 --vary lr=0.01

Choose on the dev set only; the chosen setting then gets one final measurement on the eval set
(shapes/replicate.sh SET=eval). Runs that finished are skipped, stopped ones resume, so the sweep can
be stopped and started again. This script drives the other scripts through their command lines (no
imports of scripts, no framework): what it runs is what a person would type.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

if __package__ in (
    None,
    "",
):  # `python shapes/sweep.py`: the repo root on the path, as `python -m shapes.sweep` has it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files
import flags
import models
import recipe
from losses import DEFAULT_LOSS, LOSSES

# The columns of a row: the run's settings (from its config.json; these, and every varied one), then the dev-set
# scores.
SETTINGS = ["loss", "steps", "lr", "tau", "gamma_pos", "gamma_neg", "n_tokens", "layers", "blocks", "batch", "seed"]
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and eval.py live there


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a tiny-* family (the dev set is the shapes world's)")
    p.add_argument("--loss", nargs="+", default=[DEFAULT_LOSS], choices=list(LOSSES))
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="FLAG=V1,V2",
        help="a train.py flag and its values, e.g. tau=0.3,1 or n-tokens=8,16 (repeatable)",
    )
    p.add_argument("--steps", type=flags.POSITIVE_INT, default=2000)
    p.add_argument("--seed", type=flags.SEED, default=0, help="a seed in [0, 2^63)")
    p.add_argument(
        "--n-per-category",
        type=flags.NON_NEGATIVE_INT,
        default=20,
        help="dev prompts per category (x 4 seeds; 0: all)",
    )
    p.add_argument(
        "--val-n", type=flags.POSITIVE_INT, default=8, help="train.py's end-of-run validation: prompts per category"
    )
    p.add_argument("--threads", type=flags.THREADS, default=1, help="torch CPU threads per run (0: torch's default)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<model>)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not models.is_shapes_world(args.model):
        p.error(f"--model {args.model}: the sweep scores on the shapes world's dev set; use a tiny-* model")
    for item in args.vary:
        flag, _, values = item.partition("=")
        if not flag or not values:
            p.error(f"--vary {item!r}: write FLAG=V1,V2 (a train.py flag without its dashes), e.g. tau=0.3,1")
        setting = recipe.BY_NAME.get(flag.replace("-", "_"))
        if setting is None or not setting.flag or setting.name == "loss":
            p.error(f"--vary {flag}: not a setting train.py varies (recipe.py lists them; --loss has its own flag)")
    args.out = args.out or os.path.join("runs", f"sweep-{args.model}")
    return args


def columns_of(args):
    """The settings a row shows: the usual ones, then each varied one not among them."""
    varied = [item.partition("=")[0].replace("-", "_") for item in args.vary]
    return SETTINGS + [name for name in dict.fromkeys(varied) if name not in SETTINGS]


def planned_runs(args):
    """[(name, extra train.py flags)]: each loss at its defaults, then one flag changed at a time."""
    runs = []
    for loss in args.loss:
        runs.append((f"{loss}-default", loss, []))
        for item in args.vary:
            flag, _, values = item.partition("=")
            for value in values.split(","):
                runs.append((f"{loss}-{flag}{value}", loss, [f"--{flag}", value]))
    return runs


def run(command):
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def train(args, name, loss, extra):
    """train.py for one run (skipped when its tokens exist); returns the wall seconds of this call."""
    folder = os.path.join(args.out, name)
    if os.path.exists(os.path.join(folder, "tokens.safetensors")):
        return None
    start = time.time()
    run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--model",
            args.model,
            "--loss",
            loss,
            "--steps",
            str(args.steps),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--out",
            folder,
            "--resume",
            "latest",
            "--val-every",
            str(args.steps),
            "--val-n",
            str(args.val_n),
            *extra,
        ]
    )  # validates at the start and the end only
    seconds = time.time() - start
    files.write_text(os.path.join(folder, "wall_s"), f"{seconds:.0f}\n")
    return seconds


def last_logged(folder, column):
    """The last non-empty value of a log.csv column ('' when the run never logged it)."""
    value = ""
    with open(os.path.join(folder, "log.csv")) as f:
        for row in csv.DictReader(f):
            value = row.get(column) or value
    return value


def rows(args, runs, results):
    """One dict per run (and the base first), ready for csv.DictWriter."""
    base = results["base"]
    out = [
        dict(
            run="base",
            **{c: f"{base[c][0]:.4f}" for c in CATEGORIES},
            mean=f"{base['mean'][0]:.4f}",
            mean_low=f"{base['mean'][1]:.4f}",
            mean_high=f"{base['mean'][2]:.4f}",
            overcount_counting=f"{base['overcount_counting'][0]:.4f}",
        )
    ]
    for name, _, _ in runs:
        folder = os.path.join(args.out, name)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        key = f"tokens {os.path.join(folder, 'tokens.safetensors')}"
        scores, delta = results[key], results[key + " - base"]
        wall = (
            open(os.path.join(folder, "wall_s")).read().strip()
            if os.path.exists(os.path.join(folder, "wall_s"))
            else ""
        )
        out.append(
            dict(
                run=name,
                **{s: config.get(s, "") for s in columns_of(args)},
                **{c: f"{scores[c][0]:.4f}" for c in CATEGORIES},
                mean=f"{scores['mean'][0]:.4f}",
                mean_low=f"{scores['mean'][1]:.4f}",
                mean_high=f"{scores['mean'][2]:.4f}",
                delta_mean=f"{delta['mean'][0]:+.4f}",
                delta_low=f"{delta['mean'][1]:+.4f}",
                delta_high=f"{delta['mean'][2]:+.4f}",
                overcount_counting=f"{scores['overcount_counting'][0]:.4f}",
                delta_overcount=f"{delta['overcount_counting'][0]:+.4f}",
                heldout_acc=last_logged(folder, "heldout_acc"),
                token_cos=last_logged(folder, "token_cos"),
                output_change=last_logged(folder, "output_change"),
                wall_s=wall,
            )
        )
    return out


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = planned_runs(args)
    for name, loss, extra in runs:
        train(args, name, loss, extra)
    # One protocol call for all runs: the base is sampled once and every run is paired against it.
    protocol = os.path.join(args.out, "protocol-dev.json")
    run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--protocol",
            "dev",
            "--n-per-category",
            str(args.n_per_category),
            "--model",
            args.model,
            "--threads",
            str(args.threads),
            "--json",
            protocol,
            "--tokens",
            *[os.path.join(args.out, name, "tokens.safetensors") for name, _, _ in runs],
        ]
    )
    with open(protocol) as f:
        results = json.load(f)["results"]
    table = rows(args, runs, results)
    columns = [
        "run",
        *columns_of(args),
        *CATEGORIES,
        "mean",
        "mean_low",
        "mean_high",
        "delta_mean",
        "delta_low",
        "delta_high",
        "overcount_counting",
        "delta_overcount",
        "heldout_acc",
        "token_cos",
        "output_change",
        "wall_s",
    ]
    path = os.path.join(args.out, "sweep.csv")
    files.write_csv(path, columns, table)  # atomic (files.write): a full disk keeps the last table
    for row in table:
        print(
            f"{row['run']:>24}: mean {row['mean']}"
            + (f"  Δ {row['delta_mean']} [{row['delta_low']}, {row['delta_high']}]" if row["run"] != "base" else "")
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
