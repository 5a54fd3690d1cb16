"""analyse.py: the tables of docs/gated/README.md from the protocol JSONs in docs/gated/eval/.

    python docs/gated/analyse.py                              # the first gated base (docs/gated/eval/)
    python docs/gated/analyse.py --folder docs/gated/narrow    # the narrow one (colour attribution only)

Intervals: shapes/report.py's combined interval (the training seeds' t variance and the prompt clusters'
cluster-bootstrap variance, each with its own t quantile; its coverage is measured on docs/shapes-results.md),
identical texts one cluster; the base (untagged and tagged, or a decoy) is one run, so its rows have the
prompt level alone. Differences are paired on prompts and sampling seeds. A share is (arm - untagged) /
(tagged - untagged), the share of the word's gain the arm recovers, with Fieller's interval of that ratio
(report.ratio_interval; unbounded where the gain's own interval holds 0).
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from shapes.report import combined_interval, difference_parts, ratio_interval  # noqa: E402

COLUMNS = ["color_attr", "two_object"]


def load(path, key=None):
    """One variant of a protocol JSON (its only one, or `key`): per-prompt groups, texts, provenance."""
    with open(path) as f:
        data = json.load(f)
    name = key or next(k for k in data["per_prompt"] if k != "base")
    groups = data["per_prompt"][name]
    texts = {c: [t for t, k in zip(data["prompt_texts"], data["categories"]) if k == c] for c in groups["mean"]}
    values = {c: np.asarray(groups[c][c], float) for c in groups["mean"]}
    return dict(
        groups=groups,
        values=values,
        texts=texts,
        commit=data.get("commit"),
        dirty=data.get("dirty"),
        wall_s=data.get("wall_s"),
    )


def clusters_of(arms):
    """{category: (P,) ints}: identical texts one cluster. Files score different categories (the base all six,
    the arms two); every run that scores a category must score it on the same prompts."""
    texts = {}
    for name, runs in arms.items():
        for r in runs:
            for c, these in r["texts"].items():
                if texts.setdefault(c, these) != these:
                    raise SystemExit(f"{name}: its {c} prompts differ from the others'")
    out = {}
    for c, these in texts.items():
        ids = {}
        out[c] = np.array([ids.setdefault(t, len(ids)) for t in these])
    return out


def by_run(runs):
    return {i: r["groups"] for i, r in enumerate(runs)}


def score(runs, clusters, column):
    return combined_interval(by_run(runs), clusters)[column]


def diff(runs, against, clusters, column):
    return combined_interval(by_run(runs), clusters, against=by_run(against), paired=False)[column]


def share(runs, untagged, tagged, clusters, column):
    """Fieller's interval of (runs - untagged) / (tagged - untagged) in `column`."""
    parts = [difference_parts(by_run(a), by_run(untagged), column, clusters, False) for a in (runs, tagged)]
    return ratio_interval(*parts)


def cell(value, signed=True, digits=3):
    point, low, high = value
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    show = lambda x: f.format(x) if np.isfinite(x) else ("-inf" if x < 0 else "+inf")  # noqa: E731
    return f"{show(point)} [{show(low)}, {show(high)}]"


CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def commits_of(runs):
    return ",".join(sorted({(r["commit"] or "none")[:7] + ("+dirty" if r["dirty"] else "") for r in runs}))


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
    for lr, paths in lr_runs("eval").items():  # the tokens at the lr the dev sweep chose (docs/ladder/lr/)
        arms[f"(c) tokens, lr {lr}, train.py"] = [load(p) for p in paths]
    clusters = clusters_of(arms)
    print("\n### rung (a) through train.py (eval set; shares of (a')'s gain)\n")
    print(
        "| rung | runs | commits | colour attribution | mean | Δ colour vs base | Δ mean vs base "
        "| share of (a')'s colour gain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref, base = "a' whole, train.py", arms["base"]
    for a, runs in arms.items():
        row = [a, str(len(runs)), commits_of(runs)]
        row += [cell(score(runs, clusters, c), signed=False) for c in ("color_attr", "mean")]
        if a == "base":
            row += ["", "", ""]
        else:
            row += [cell(diff(runs, base, clusters, c)) for c in ("color_attr", "mean")]
            gain = share(runs, base, arms[ref], clusters, "color_attr")
            row.append(cell(gain, signed=False, digits=2))
        print("| " + " | ".join(row) + " |")
    for a, runs in arms.items():
        if len(runs) > 1:
            print(f"- {a}: colour per seed " + " / ".join(f"{r['values']['color_attr'].mean():.3f}" for r in runs))


LR_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ladder", "lr")
LR_NAME = re.compile(r"tokens-lr(?P<lr>[0-9.e-]+)-seed(?P<seed>\d+)-(?P<set>dev|eval)\.json$")


def lr_runs(which):
    """{lr: [paths]} of docs/ladder/lr/'s token runs on `which` set, the lrs in increasing order."""
    found = {}
    for path in sorted(glob.glob(os.path.join(LR_FOLDER, f"tokens-lr*-{which}.json"))):
        m = LR_NAME.search(os.path.basename(path))
        found.setdefault(m.group("lr"), []).append(path)
    return dict(sorted(found.items(), key=lambda kv: float(kv[0])))


def sweep():
    """The tokens' lr sweep on dev (docs/ladder/lr/): each file against its own base pass, one seed each."""
    runs = lr_runs("dev")
    if not runs:
        return
    print("\n### tokens 16 x 4, dsm, one seed each, dev set, against the shipped base\n")
    print("| lr | commit | colour attribution | mean | Δ colour vs base | Δ mean vs base |")
    print("|---|---|---|---|---|---|")
    for lr, paths in runs.items():
        arms = {"base": [load(paths[0], "base")], "tokens": [load(p) for p in paths]}
        clusters = clusters_of(arms)
        row = [lr, commits_of(arms["tokens"])]
        row += [cell(score(arms["tokens"], clusters, c), signed=False) for c in ("color_attr", "mean")]
        row += [cell(diff(arms["tokens"], arms["base"], clusters, c)) for c in ("color_attr", "mean")]
        print("| " + " | ".join(row) + " |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval"))
    args = p.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    ladder(os.path.join(here, "ladder"))
    sweep()
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
        clusters = clusters_of(arms)
        untagged, tagged = arms["untagged"], arms["tagged"]
        columns = [c for c in COLUMNS if c in untagged[0]["groups"]]  # the narrow base: colour attribution
        print(f"\n### {which} set (share: (arm - untagged) / (tagged - untagged))\n")
        print(
            "| variant | runs | commit | "
            + " | ".join(f"{c}" for c in columns)
            + " | "
            + " | ".join(f"Δ {c} vs untagged" for c in columns)
            + " | share of the word's gain, "
            + " | share, ".join(columns)
            + " |"
        )
        print("|" + "---|" * (3 + 3 * len(columns)))
        order = ["untagged", "tagged"] + sorted(k for k in arms if k not in ("untagged", "tagged"))
        for arm in order:
            runs = arms[arm]
            row = [arm, str(len(runs)), commits_of(runs)]
            row += [cell(score(runs, clusters, c), signed=False) for c in columns]
            if arm == "untagged":
                row += [""] * (2 * len(columns))
            else:
                row += [cell(diff(runs, untagged, clusters, c)) for c in columns]
                row += [cell(share(runs, untagged, tagged, clusters, c), signed=False, digits=2) for c in columns]
            print("| " + " | ".join(row) + " |")
        if all("position" in r["groups"] for runs in (untagged, tagged) for r in runs):
            print(
                f"\nposition: untagged {cell(score(untagged, clusters, 'position'), signed=False)}, "
                f"tagged {cell(score(tagged, clusters, 'position'), signed=False)}, "
                f"tagged - untagged {cell(diff(tagged, untagged, clusters, 'position'))}"
            )
        print("\nPer-seed means (" + ", ".join(columns) + "):\n")
        for arm in order:
            if len(arms[arm]) > 1:
                seeds = [" / ".join(f"{r['values'][c].mean():.3f}" for c in columns) for r in arms[arm]]
                print(f"- {arm}: " + "; ".join(seeds))


if __name__ == "__main__":
    main()
