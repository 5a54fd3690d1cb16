"""The ladder's tables from the per-variant JSONs of docs/ladder/eval/ (shapes/ladder_eval.py).

    python docs/ladder/analyse.py > docs/ladder/tables.md

Intervals: a two-level paired bootstrap (4,000 resamples, fixed generator). Each resample draws, for each
arm, its training seeds with replacement (the arms' seeds are drawn independently: seed s of one arm and
seed s of another share nothing), and, for each category, the distinct prompt *texts* with replacement
(every prompt with a drawn text comes in, so a text repeated in the set is one cluster); the same prompt
draw serves every arm and the base in that resample, so the differences are paired on prompts and
sampling seeds. A column's value: the mean over categories of the mean over prompts of the mean over the
arm's seeds (each prompt's value is already the mean of its 4 sampled images). "Recovered": (rung - base)
/ (whole denoiser - base), per resample; its interval is wide and unstable where the denominator's
interval comes near 0. With 3 seeds the seed level of the bootstrap is coarse (it can only ever draw
those 3): read the intervals as approximate.
"""

import glob
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
SEED = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)$")
B = 4000


def load(folder, prefix=""):
    arms, base, meta = {}, None, None
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)[:-5]
        if name in ("base", "overfit-base") or not name.startswith(prefix):
            continue
        if prefix == "" and name.startswith("overfit"):
            continue
        d = json.load(open(path))
        key = next(k for k in d["per_prompt"] if k != "base")
        m = SEED.match(name)
        arm, seed = (m["arm"], int(m["seed"])) if m else (name, 0)
        per_cat = {c: np.asarray(d["per_prompt"][key][c][c], float) for c in CATEGORIES if c in d["per_prompt"][key]}
        arms.setdefault(arm, {})[seed] = per_cat
        b = {c: np.asarray(d["per_prompt"]["base"][c][c], float) for c in per_cat}
        if base is None:
            base, meta = b, d
        assert all(np.array_equal(base[c], b[c]) for c in b), f"{path}: another base"
        assert d["prompt_texts"] == meta["prompt_texts"], f"{path}: other prompts"
    return arms, base, meta


def clusters(meta, categories):
    """{category: [index arrays of the prompts (within the category) sharing one text]}"""
    out = {}
    for c in categories:
        texts = [t for t, k in zip(meta["prompt_texts"], meta["categories"]) if k == c]
        order = {}
        for i, t in enumerate(texts):
            order.setdefault(t, []).append(i)
        out[c] = [np.asarray(v) for v in order.values()]
    return out


def value(per_seed, seeds, draw, columns):
    """{column: value} for an arm's seeds (list of per-category arrays) under one prompt draw."""
    cat = {}
    for c in columns["cats"]:
        idx = draw[c]
        cat[c] = np.mean([per_seed[s][c][idx].mean() for s in seeds])
    out = dict(cat)
    out["mean"] = np.mean([cat[c] for c in columns["cats"]])
    return out


def bootstrap(arms, base, meta, rng):
    cats = [c for c in CATEGORIES if c in base]
    cl = clusters(meta, cats)
    columns = {"cats": cats}
    names = list(arms)
    full = {c: np.arange(len(base[c])) for c in cats}
    point = {a: value(arms[a], list(arms[a]), full, columns) for a in names}
    point["base"] = value({0: base}, [0], full, columns)
    boots = {a: [] for a in names + ["base"]}
    for _ in range(B):
        draw = {}
        for c in cats:
            pick = rng.integers(0, len(cl[c]), len(cl[c]))
            draw[c] = np.concatenate([cl[c][k] for k in pick])
        for a in names:
            seeds = list(arms[a])
            drawn = [seeds[k] for k in rng.integers(0, len(seeds), len(seeds))]
            boots[a].append(value(arms[a], drawn, draw, columns))
        boots["base"].append(value({0: base}, [0], draw, columns))
    return point, boots, cats


def ci(samples):
    return np.percentile(samples, 2.5), np.percentile(samples, 97.5)


def fmt(v, lo, hi, signed=True):
    s = "+" if signed else ""
    return f"{v:{s}.3f} [{lo:{s}.3f}, {hi:{s}.3f}]"


def ladder_table(point, boots, cats, arms, order, ref="a-whole-dsm"):
    cols = cats + ["mean"]
    lines = ["| arm | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    lines.append(
        "| base | - | "
        + " | ".join(fmt(point["base"][c], *ci([b[c] for b in boots["base"]]), False) for c in cols)
        + " |"
    )
    for a in order:
        if a not in point:
            continue
        lines.append(
            f"| {a} | {len(arms[a])} | "
            + " | ".join(fmt(point[a][c], *ci([b[c] for b in boots[a]]), False) for c in cols)
            + " |"
        )
    lines += ["", "| Δ against the base | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for a in order:
        if a not in point:
            continue
        cells = []
        for c in cols:
            d = [b[c] - bb[c] for b, bb in zip(boots[a], boots["base"])]
            cells.append(fmt(point[a][c] - point["base"][c], *ci(d)))
        lines.append(f"| {a} − base | {len(arms[a])} | " + " | ".join(cells) + " |")
    if ref in point:
        lines += ["", f"| share of ({ref} − base) recovered | seeds | color_attr | mean |", "|---|---|---|---|"]
        for a in order:
            if a not in point or a == ref:
                continue
            cells = []
            for c in ("color_attr", "mean"):
                num = np.array([b[c] - bb[c] for b, bb in zip(boots[a], boots["base"])])
                den = np.array([b[c] - bb[c] for b, bb in zip(boots[ref], boots["base"])])
                r = num / np.where(np.abs(den) < 1e-9, np.nan, den)
                r = r[np.isfinite(r)]
                pr = (point[a][c] - point["base"][c]) / (point[ref][c] - point["base"][c])
                cells.append(f"{pr:+.2f} [{np.percentile(r, 2.5):+.2f}, {np.percentile(r, 97.5):+.2f}]")
            lines.append(f"| {a} | {len(arms[a])} vs {len(arms[ref])} | " + " | ".join(cells) + " |")
        lines += ["", "| Δ against the whole denoiser | seeds | color_attr | mean |", "|---|---|---|---|"]
        for a in order:
            if a not in point or a == ref:
                continue
            cells = []
            for c in ("color_attr", "mean"):
                d = [b[c] - r[c] for b, r in zip(boots[a], boots[ref])]
                cells.append(fmt(point[a][c] - point[ref][c], *ci(d)))
            lines.append(f"| {a} − {ref} | {len(arms[a])} vs {len(arms[ref])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overfit_table(folder):
    """Per spec: base and each loss's tokens, share of 16 images right; the mean with a bootstrap over
    specs (each spec's 16 images resampled within it too)."""
    rows, base, texts = {}, None, None
    for path in sorted(glob.glob(os.path.join(folder, "overfit-tokens-*.json"))):
        d = json.load(open(path))
        key = next(k for k in d["verdicts"] if k != "base")
        n = d["samples_per_prompt"]
        rows[key] = np.asarray(d["verdicts"][key], float).reshape(-1, n)
        base, texts = np.asarray(d["verdicts"]["base"], float).reshape(-1, n), d["prompt_texts"]
    if base is None:
        return ""
    rng = np.random.default_rng(1)
    P, n = base.shape
    names = list(rows)
    lines = ["| spec | base | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for i, t in enumerate(texts):
        lines.append(f"| {t} | {base[i].mean():.2f} | " + " | ".join(f"{rows[k][i].mean():.2f}" for k in names) + " |")
    picks = rng.integers(0, P, (B, P))
    inner = rng.integers(0, n, (B, P, n))

    def boot(m):
        return np.take_along_axis(m[picks], inner, axis=2).mean(axis=(1, 2))

    bb = boot(base)
    lines.append(
        f"| mean of {P} specs x {n} seeds | {fmt(base.mean(), *ci(bb), False)} | "
        + " | ".join(fmt(rows[k].mean(), *ci(boot(rows[k])), False) for k in names)
        + " |"
    )
    lines.append(
        "| Δ against the base | | "
        + " | ".join(fmt(rows[k].mean() - base.mean(), *ci(boot(rows[k]) - bb)) for k in names)
        + " |"
    )
    return "\n".join(lines)


def winner(arms, base):
    """The rule fixed before the losses ran: of (b) LoRA and (c) tokens, the one whose pooled eval mean
    (all seeds) is higher; ties to the tokens. Printed as 'lora' or 'tokens'."""
    cats = [c for c in CATEGORIES if c in base]
    full = {c: np.arange(len(base[c])) for c in cats}
    m = {a: value(arms[a], list(arms[a]), full, {"cats": cats})["mean"] for a in ("b-lora-dsm", "c-tokens-dsm")}
    return "lora" if m["b-lora-dsm"] > m["c-tokens-dsm"] else "tokens"


def main():
    argv = sys.argv[1:]
    folder = os.path.join(HERE, "eval")
    if argv[:1] == ["--folder"]:
        folder, argv = argv[1], argv[2:]
    arms, base, meta = load(folder)
    if argv == ["--winner"]:
        print(winner(arms, base))
        return
    order = ["a-whole-dsm", "b-lora-dsm", "c-tokens-dsm", "tokens-softrepa", "lora-softrepa", "tokens-agsm"]
    order += [a for a in arms if a not in order]
    if arms:
        point, boots, cats = bootstrap(arms, base, meta, np.random.default_rng(0))
        print(f"## {meta['model']}, eval set: {len(meta['prompt_texts'])} prompts x 4 sampling seeds\n")
        print(ladder_table(point, boots, cats, arms, order))
        print()
        for a in order:
            if a in arms:
                per = {
                    s: value(arms[a], [s], {c: np.arange(len(base[c])) for c in cats}, {"cats": cats}) for s in arms[a]
                }
                print(
                    f"- {a}: per-seed color_attr "
                    + ", ".join(f"s{s} {v['color_attr']:.3f}" for s, v in sorted(per.items()))
                    + "; mean "
                    + ", ".join(f"s{s} {v['mean']:.3f}" for s, v in sorted(per.items()))
                )
    table = overfit_table(folder)
    if table:
        print("\n## The overfit check (16 sampling seeds 0..15 per spec)\n")
        print(table)


if __name__ == "__main__":
    sys.exit(main())
