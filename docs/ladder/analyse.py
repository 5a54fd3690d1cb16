"""The ladder's tables from the per-variant JSONs of docs/ladder/eval/ (shapes/ladder_eval.py).

    python docs/ladder/analyse.py > docs/ladder/tables.md

Every interval is shapes.report's combined interval (its 95% intervals, coverage measured there): the
seed level's t variance and the prompt clusters' bootstrap variance, each with its own t quantile
(Banerjee). Each prompt's value is already the mean of its 4 sampled images; a text repeated in the set
is one cluster; every arm and the base are scored on the same prompts and sampling seeds, so the
differences are paired prompt by prompt. The arms' training runs are not paired: rung (a) trained through
shapes.pretrain and the others through train.py, so seed s of one arm and seed s of another share nothing
guaranteed, and each arm's runs bring their own seed level. A column: the mean over categories of the mean
over prompts of the mean over the arm's seeds. "Share recovered": (rung - base) / (whole denoiser - base),
with Fieller's interval for a ratio (shapes.report.ratio_interval), unbounded where the denominator's own
interval holds 0. Rows made by different code or encodings (each file's "provenance") are marked.
"""

import glob
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # shapes.report, run from the repo root or from here

from shapes import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
SEED = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)$")


def load(folder):
    """({arm: {seed: per-prompt groups}}, base groups, the first file (texts, categories), {arm: version})."""
    arms, base, meta, versions = {}, None, None, {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)[:-5]
        if name == "base" or name.startswith("overfit"):
            continue
        with open(path) as f:
            d = json.load(f)
        key = next(k for k in d["per_prompt"] if k != "base")
        m = SEED.match(name)
        arm, seed = (m["arm"], int(m["seed"])) if m else (name, 0)
        arms.setdefault(arm, {})[seed] = d["per_prompt"][key]
        versions.setdefault(arm, set()).add(report.code_version(d, path))
        if base is None:
            base, meta = d["per_prompt"]["base"], d
        if d["per_prompt"]["base"] != base or d["prompt_texts"] != meta["prompt_texts"]:
            raise SystemExit(f"{path}: another base or other prompts than {folder}'s other files")
    return arms, base, meta, {arm: " + ".join(sorted(v)) for arm, v in versions.items()}


def clusters(meta):
    """{category: (P,) ints}: the prompts (within each category) sharing one text, from the file's texts."""
    out = {}
    for category in dict.fromkeys(meta["categories"]):
        texts = [t for t, k in zip(meta["prompt_texts"], meta["categories"]) if k == category]
        ids = {}
        out[category] = np.array([ids.setdefault(t, len(ids)) for t in texts])
    return out


def columns(base):
    return [c for c in CATEGORIES if c in base] + ["mean"]


def fmt(v, lo, hi, signed=True):
    s = "+" if signed else ""
    return f"{v:{s}.3f} [{lo:{s}.3f}, {hi:{s}.3f}]"


def ratio_cell(value, low, high):
    if not np.isfinite(low):
        return f"{value:+.2f} (unbounded: the denominator's interval holds 0)"
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def ladder_table(arms, base, cl, order, marks, ref="a-whole-dsm"):
    cols = columns(base)
    base_runs = {"base": base}
    lines = ["| arm | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    scores = report.combined_interval(base_runs, cl)
    lines.append("| base | - | " + " | ".join(fmt(*scores[c], signed=False) for c in cols) + " |")
    for a in order:
        scores = report.combined_interval(arms[a], cl)
        lines.append(
            f"| {a}{marks[a]} | {len(arms[a])} | " + " | ".join(fmt(*scores[c], signed=False) for c in cols) + " |"
        )
    lines += ["", "| Δ against the base | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for a in order:
        diff = report.combined_interval(arms[a], cl, base_runs)
        lines.append(f"| {a}{marks[a]} − base | {len(arms[a])} | " + " | ".join(fmt(*diff[c]) for c in cols) + " |")
    if ref not in arms:
        return "\n".join(lines)
    lines += [
        "",
        f"| share of ({ref} − base) recovered (Fieller) | seeds | color_attr | mean |",
        "|---|---|---|---|",
    ]
    for a in order:
        if a == ref:
            continue
        cells = []
        for c in ("color_attr", "mean"):
            parts = [report.difference_parts(x, base_runs, c, cl, False) for x in (arms[a], arms[ref])]
            cells.append(ratio_cell(*report.ratio_interval(*parts)))
        lines.append(f"| {a}{marks[a]} | {len(arms[a])} vs {len(arms[ref])} | " + " | ".join(cells) + " |")
    lines += ["", "| Δ against the whole denoiser | seeds | color_attr | mean |", "|---|---|---|---|"]
    for a in order:
        if a == ref:
            continue
        diff = report.combined_interval(arms[a], cl, arms[ref], paired=False)
        lines.append(
            f"| {a}{marks[a]} − {ref}{marks[ref]} | {len(arms[a])} vs {len(arms[ref])} | "
            + " | ".join(fmt(*diff[c]) for c in ("color_attr", "mean"))
            + " |"
        )
    return "\n".join(lines)


def overfit_table(folder):
    """Per spec: base and each loss's tokens (one run each), share of 16 images right; the mean over the
    10 specs with the combined interval (one run: the specs alone, each spec one cluster, 9 df)."""
    rows, base, texts = {}, None, None
    for path in sorted(glob.glob(os.path.join(folder, "overfit-tokens-*.json"))):
        with open(path) as f:
            d = json.load(f)
        key = next(k for k in d["verdicts"] if k != "base")
        n = d["samples_per_prompt"]
        rows[key] = np.asarray(d["verdicts"][key], float).reshape(-1, n).mean(1)
        base, texts = np.asarray(d["verdicts"]["base"], float).reshape(-1, n).mean(1), d["prompt_texts"]
    if base is None:
        return ""
    specs = {"overfit": np.arange(len(base))}

    def runs(values):
        return {0: {"mean": {"overfit": values}}}

    names = list(rows)
    lines = ["| spec | base | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for i, t in enumerate(texts):
        lines.append(f"| {t} | {base[i]:.2f} | " + " | ".join(f"{rows[k][i]:.2f}" for k in names) + " |")
    score = {k: report.combined_interval(runs(v), specs)["mean"] for k, v in rows.items()}
    diff = {k: report.combined_interval(runs(v), specs, runs(base))["mean"] for k, v in rows.items()}
    base_score = report.combined_interval(runs(base), specs)["mean"]
    lines.append(
        f"| mean of {len(base)} specs x {n} seeds | {fmt(*base_score, False)} | "
        + " | ".join(fmt(*score[k], False) for k in names)
        + " |"
    )
    lines.append("| Δ against the base | | " + " | ".join(fmt(*diff[k]) for k in names) + " |")
    return "\n".join(lines)


def winner(arms, base):
    """The rule fixed before the losses ran: of (b) LoRA and (c) tokens, the one whose pooled eval mean
    (all seeds) is higher; ties to the tokens. Printed as 'lora' or 'tokens'."""
    cl = {c: np.arange(len(base[c][c])) for c in CATEGORIES if c in base}
    m = {a: report.combined_interval(arms[a], cl)["mean"][0] for a in ("b-lora-dsm", "c-tokens-dsm")}
    return "lora" if m["b-lora-dsm"] > m["c-tokens-dsm"] else "tokens"


def main():
    argv = sys.argv[1:]
    folder = os.path.join(HERE, "eval")
    if argv[:1] == ["--folder"]:
        folder, argv = argv[1], argv[2:]
    arms, base, meta, versions = load(folder)
    if argv == ["--winner"]:
        print(winner(arms, base))
        return
    order = ["a-whole-dsm", "b-lora-dsm", "c-tokens-dsm", "lora-softrepa", "tokens-agsm"]
    order = [a for a in order if a in arms] + [a for a in arms if a not in order]
    if arms:
        marks, note = report.version_marks(versions, True, "the ladder")
        cl = clusters(meta)
        print(f"## {meta['model']}, eval set: {len(meta['prompt_texts'])} prompts x 4 sampling seeds\n")
        print(ladder_table(arms, base, cl, order, marks))
        print(f"\n{note}\n")
        for a in order:
            per = {s: report.combined_interval({s: arms[a][s]}, cl) for s in sorted(arms[a])}
            print(
                f"- {a}: per-seed color_attr "
                + ", ".join(f"s{s} {v['color_attr'][0]:.3f}" for s, v in per.items())
                + "; mean "
                + ", ".join(f"s{s} {v['mean'][0]:.3f}" for s, v in per.items())
            )
    table = overfit_table(folder)
    if table:
        print("\n## The overfit check (16 sampling seeds 0..15 per spec)\n")
        print(table)


if __name__ == "__main__":
    sys.exit(main())
