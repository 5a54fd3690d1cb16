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


def load(path, key=None):
    """One variant of a protocol JSON (its only one, or `key`): per-category values, texts, provenance."""
    with open(path) as f:
        data = json.load(f)
    name = key or next(k for k in data["per_prompt"] if k != "base")
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


CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def ladder(folder):
    """Rung (a) through train.py --params all against the base and the ladder's rungs (docs/ladder/eval/)."""
    here = sorted(glob.glob(os.path.join(folder, "a-all-dsm-seed*.json")))
    if not here:
        return
    old = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ladder", "eval")
    arms = {"base": [load(here[0], "base")], "a' whole, train.py": [load(p) for p in here]}
    for rung, label in (
        ("a-whole-dsm", "(a) whole, pretrain.py loop"),
        ("b-lora-dsm", "(b) LoRA"),
        ("c-tokens-dsm", "(c) tokens"),
    ):
        arms[label] = [load(p) for p in sorted(glob.glob(os.path.join(old, f"{rung}-seed*.json")))]
    d = draws(arms, CATEGORIES)
    mean = {
        a: (np.mean([d[a][c][0] for c in CATEGORIES]), np.mean([d[a][c][1] for c in CATEGORIES], axis=0)) for a in d
    }
    commits = {
        a: sorted({(r["commit"] or "none")[:7] + ("+dirty" if r["dirty"] else "") for r in runs})
        for a, runs in arms.items()
    }
    print("\n### rung (a) through train.py (eval set; shares of (a')'s gain)\n")
    print(
        "| rung | runs | commits | colour attribution | mean | Δ colour vs base | Δ mean vs base "
        "| share of (a')'s colour gain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref = "a' whole, train.py"
    for a in arms:
        col = d[a]["color_attr"]
        row = [a, str(len(arms[a])), ",".join(commits[a]), cell(*col, signed=False), cell(*mean[a], signed=False)]
        if a == "base":
            row += ["", "", ""]
        else:
            base_c, base_m = d["base"]["color_attr"], mean["base"]
            row += [cell(col[0] - base_c[0], col[1] - base_c[1]), cell(mean[a][0] - base_m[0], mean[a][1] - base_m[1])]
            with np.errstate(divide="ignore", invalid="ignore"):
                share = (
                    (col[0] - base_c[0]) / (d[ref]["color_attr"][0] - base_c[0]),
                    (col[1] - base_c[1]) / (d[ref]["color_attr"][1] - base_c[1]),
                )
            row.append(cell(*share, signed=False, digits=2))
        print("| " + " | ".join(row) + " |")
    for a in arms:
        if len(arms[a]) > 1:
            print(f"- {a}: colour per seed " + " / ".join(f"{r['values']['color_attr'].mean():.3f}" for r in arms[a]))


def sweep(folder):
    """The tokens' lr sweep on dev: each file against its own base, one seed each (prompt-level intervals)."""
    paths = sorted(glob.glob(os.path.join(folder, "tokens-lr*-dev.json")))
    if not paths:
        return
    print("\n### tokens 16 x 4, dsm, one seed each, dev set, against the shipped base\n")
    print("| lr | commit | colour attribution | mean | Δ colour vs base | Δ mean vs base |")
    print("|---|---|---|---|---|---|")
    for path in sorted(paths, key=lambda p: float(re.search(r"lr([0-9.e-]+)-dev", p).group(1))):
        arms = {"base": [load(path, "base")], "tokens": [load(path)]}
        d = draws(arms, CATEGORIES)
        mean = {
            a: (np.mean([d[a][c][0] for c in CATEGORIES]), np.mean([d[a][c][1] for c in CATEGORIES], axis=0))
            for a in d
        }
        col, base_c = d["tokens"]["color_attr"], d["base"]["color_attr"]
        lr = re.search(r"lr([0-9.e-]+)-dev", path).group(1)
        row = [
            lr,
            (arms["tokens"][0]["commit"] or "none")[:7],
            cell(*col, signed=False),
            cell(*mean["tokens"], signed=False),
        ]
        row += [
            cell(col[0] - base_c[0], col[1] - base_c[1]),
            cell(mean["tokens"][0] - mean["base"][0], mean["tokens"][1] - mean["base"][1]),
        ]
        print("| " + " | ".join(row) + " |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval"))
    args = p.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    ladder(os.path.join(here, "ladder"))
    sweep(os.path.join(here, "sweep"))
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
        both = {k: arms[k] for k in ("untagged", "tagged")}
        if all("position" in r["values"] for runs in both.values() for r in runs):
            p = draws(both, ["position"])
            diff = cell(
                p["tagged"]["position"][0] - p["untagged"]["position"][0],
                p["tagged"]["position"][1] - p["untagged"]["position"][1],
            )
            print(
                f"\nposition: untagged {cell(*p['untagged']['position'], signed=False)}, "
                f"tagged {cell(*p['tagged']['position'], signed=False)}, tagged - untagged {diff}"
            )
        print("\nPer-seed means (" + ", ".join(COLUMNS) + "):\n")
        for arm in order:
            if len(arms[arm]) > 1:
                seeds = [" / ".join(f"{r['values'][c].mean():.3f}" for c in COLUMNS) for r in arms[arm]]
                print(f"- {arm}: " + "; ".join(seeds))


if __name__ == "__main__":
    main()
