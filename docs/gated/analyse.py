"""analyse.py: the tables of docs/gated/README.md from the protocol JSONs in docs/gated/eval/.

    python docs/gated/analyse.py [--set eval] [--folder docs/gated/eval]

Intervals: shapes/report.py's two-level bootstrap (its resample_counts; 4,000 draws): each category's prompt
clusters (identical texts one cluster) resampled, and each arm's training seeds resampled, independently
per arm; the base (untagged and tagged, or a decoy) is one run. Every row and column uses the same prompt
draws, so the differences are paired on prompts and sampling seeds. A share is (arm - untagged) /
(tagged - untagged), one value per draw: the share of the word's gain the arm recovers.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from shapes.report import BOOTSTRAP_DRAWS, resample_counts  # noqa: E402

COLUMNS = ["color_attr", "two_object"]


def load(path):
    with open(path) as f:
        data = json.load(f)
    (name,) = data["per_prompt"]
    groups = data["per_prompt"][name]
    texts = {c: [t for t, k in zip(data["prompt_texts"], data["categories"]) if k == c] for c in groups["mean"]}
    values = {c: np.asarray(groups[c][c], float) for c in groups["mean"]}
    return dict(
        values=values, texts=texts, commit=data.get("commit"), dirty=data.get("dirty"), wall_s=data.get("wall_s")
    )


def draws(arms, columns, n=BOOTSTRAP_DRAWS, seed=0):
    """{arm: {column: (point, draws (n,))}} for arms {name: [runs]}: prompt clusters and seeds resampled."""
    rng = np.random.default_rng([seed, 0])
    weights = {}
    first = next(iter(arms.values()))[0]
    for c in columns:
        ids = {}
        cluster = np.array([ids.setdefault(t, len(ids)) for t in first["texts"][c]])
        weights[c] = resample_counts(len(ids), n, rng)[:, cluster]  # (n, P)
    out = {}
    for k, (name, runs) in enumerate(sorted(arms.items())):
        seed_w = resample_counts(len(runs), n, np.random.default_rng([seed, 1, k]))  # (n, S)
        out[name] = {}
        for c in columns:
            for r in runs:
                if r["texts"][c] != first["texts"][c]:
                    raise SystemExit(f"{name}: its {c} prompts differ from the others'")
            values = np.stack([r["values"][c] for r in runs])  # (S, P)
            per_draw = seed_w @ values / seed_w.sum(1, keepdims=True)  # (n, P)
            w = weights[c]
            out[name][c] = (values.mean(), (w * per_draw).sum(1) / w.sum(1))
    return out


def cell(point, boot, signed=True, digits=3):
    boot = np.where(np.isfinite(boot), boot, np.nan)  # a share's draws where the gain is 0: left out
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(point)} [{f.format(lo)}, {f.format(hi)}]"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval"))
    args = p.parse_args()
    for which in ("dev", "eval"):
        base = {k: os.path.join(args.folder, f"base-{which}-{k}.json") for k in ("untagged", "tagged")}
        if not all(os.path.exists(v) for v in base.values()):
            continue
        arms = {k: [load(v)] for k, v in base.items()}
        for path in sorted(glob.glob(os.path.join(args.folder, f"base-{which}-*.json"))):
            key = re.match(rf"base-{which}-(.*)\.json", os.path.basename(path)).group(1)
            arms.setdefault(key, [load(path)])
        for path in sorted(glob.glob(os.path.join(args.folder, f"*-seed*-{which}.json"))):
            arm = re.match(rf"(.*)-seed\d+-{which}\.json", os.path.basename(path)).group(1)
            arms.setdefault(arm, []).append(load(path))
        commits = {
            arm: sorted({(r["commit"] or "none")[:7] + ("+dirty" if r["dirty"] else "") for r in runs})
            for arm, runs in arms.items()
        }
        d = draws(arms, COLUMNS)
        print(f"\n### {which} set (share: (arm - untagged) / (tagged - untagged))\n")
        print(
            "| variant | runs | commit | "
            + " | ".join(f"{c}" for c in COLUMNS)
            + " | "
            + " | ".join(f"Δ {c} vs untagged" for c in COLUMNS)
            + " | share of the word's gain, "
            + " | share, ".join(COLUMNS)
            + " |"
        )
        print("|" + "---|" * (3 + 3 * len(COLUMNS)))
        order = ["untagged", "tagged"] + sorted(k for k in arms if k not in ("untagged", "tagged"))
        for arm in order:
            row = [arm, str(len(arms[arm])), ",".join(commits[arm])]
            row += [cell(*d[arm][c], signed=False) for c in COLUMNS]
            for c in COLUMNS:
                point = d[arm][c][0] - d["untagged"][c][0]
                row.append(cell(point, d[arm][c][1] - d["untagged"][c][1]))
            for c in COLUMNS:
                gain_p, gain_b = d["tagged"][c][0] - d["untagged"][c][0], d["tagged"][c][1] - d["untagged"][c][1]
                share_p = (d[arm][c][0] - d["untagged"][c][0]) / gain_p
                with np.errstate(divide="ignore", invalid="ignore"):
                    share_b = (d[arm][c][1] - d["untagged"][c][1]) / gain_b
                row.append(cell(share_p, share_b, signed=False, digits=2))
            print("| " + " | ".join(row) + " |")
        print("\nPer-seed means (" + ", ".join(COLUMNS) + "):\n")
        for arm in order:
            if len(arms[arm]) > 1:
                seeds = [" / ".join(f"{r['values'][c].mean():.3f}" for c in COLUMNS) for r in arms[arm]]
                print(f"- {arm}: " + "; ".join(seeds))


if __name__ == "__main__":
    main()
