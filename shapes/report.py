"""report.py: the replication table and the training-dynamics plot of the shapes world, from the run
folders and the protocol JSON that shapes/replicate.sh writes (SoftREPA Table 1 and eqs. 15-18, AGSM
Table 1 and Fig. 4).

    python -m shapes.report --model tiny-sd3 --json runs/replicate/tiny-sd3-eval.json --plot dynamics.png

One row per method: base, dsm (AGSM Table 4 (i)), SoftREPA, AGSM. A method's score pools its training
seeds: each prompt's value is the mean over its seeds x 4 sampling seeds (eval.py --protocol saves the
per-prompt values), and the 95% interval is checker.bootstrap_interval over prompts within categories.
The "Δ" rows pair the pooled method with the base prompt by prompt (checker.paired_difference). Those
intervals treat the trained tokens as given: with 3 training seeds, the seed-to-seed spread is shown on
its own (the range of the per-seed means), not folded into a bootstrap. The held-out classifier
accuracy, the token movement and the wall time come from each run's log.csv and wall_s.
"""

import argparse
import csv
import json
import os
import re
import sys

import numpy as np

if __package__ in (
    None,
    "",
):  # `python shapes/report.py`: the repo root on the path, as `python -m shapes.report` has it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flags
from shapes import checker

METHODS = ["dsm", "softrepa", "agsm"]
NAMES = {"base": "base", "dsm": "dsm (AGSM Table 4 (i))", "softrepa": "SoftREPA", "agsm": "AGSM"}
COLUMNS = [*checker.CATEGORIES, "mean", "overcount_counting", "overcount_single"]
FOLDER = re.compile(r"(?P<model>.+)-(?P<loss>dsm|softrepa|agsm)-seed(?P<seed>\d+)$")  # a run folder's name
TOKENS = re.compile(r"tokens (?P<folder>.*)/tokens\.safetensors$")  # a protocol JSON's key


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=[],
        nargs="+",
        help="tiny-sd3, tiny-sd1.5 (one per --json; a model "
        "named twice merges its files: token files split over two eval.py calls, same base)",
    )
    p.add_argument("--json", default=[], nargs="+", help="eval.py --protocol output, one per --model")
    p.add_argument("--plot", default=None, help="the dynamics plot (PNG): validation score and token movement")
    p.add_argument(
        "--plot-runs",
        nargs="+",
        default=[],
        help="draw the plot from these run folders "
        "(<model>-<loss>-seed<N>, e.g. reruns validated more densely) instead of the JSON's",
    )
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--sweep", nargs="*", default=[], help="sweep.py CSVs to print as tables too")
    p.add_argument(
        "--arms",
        nargs="*",
        default=[],
        help="protocol JSONs, one per arm (#26: shapes.gpu_jobs --set "
        "arms): pooled arms and their paired differences with --reference and the base",
    )
    p.add_argument("--reference", default="tokens-softrepa", help="--arms: the arm the others are paired with")
    p.add_argument(
        "--deltas",
        nargs="*",
        default=[],
        help="protocol JSONs: one row per token file, its paired "
        "difference with the base (the capacity control), and its run's output change",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot_runs and not args.plot:
        p.error("--plot-runs needs --plot FILE")
    for folder in args.plot_runs:
        if not FOLDER.match(os.path.basename(os.path.normpath(folder))) or not os.path.exists(
            os.path.join(folder, "log.csv")
        ):
            p.error(f"--plot-runs {folder}: not a run folder named <model>-<loss>-seed<N> with a log.csv")
    if not args.json and not args.sweep and not args.plot_runs and not args.deltas and not args.arms:
        p.error(
            "nothing to report: give --model M --json FILE (shapes/replicate.sh's protocol), --sweep CSV, "
            "--deltas or --arms JSONs"
        )
    if len(args.model) != len(args.json):
        p.error(f"{len(args.model)} --model but {len(args.json)} --json: give one protocol JSON per model")
    for path in args.json:
        if not os.path.exists(path):
            p.error(f"--json {path}: no such file (run shapes/replicate.sh, or eval.py --protocol, first)")
    return args


def runs_by_method(results, beside="."):
    """{loss: [(seed, folder, name)]} of the token files in a protocol JSON. A run folder that is not where
    the JSON says (copied, e.g. runs/replicate -> docs/replicate) is looked for beside the JSON."""
    found = {}
    for name in results:
        tokens = TOKENS.match(name)
        match = tokens and FOLDER.match(os.path.basename(tokens["folder"]))
        if match:
            folder = tokens["folder"]
            if not os.path.isdir(folder):
                folder = os.path.join(beside, os.path.basename(folder))
            found.setdefault(match["loss"], []).append((int(match["seed"]), folder, name))
    return {loss: sorted(found[loss]) for loss in METHODS if loss in found}


def runs_in_folders(folders):
    """[(model, {loss: [(seed, folder, name)]})] of run folders named <model>-<loss>-seed<N>."""
    found = {}
    for folder in folders:
        match = FOLDER.match(os.path.basename(os.path.normpath(folder)))
        found.setdefault(match["model"], {}).setdefault(match["loss"], []).append((int(match["seed"]), folder, folder))
    return [
        (model, {loss: sorted(by_loss[loss]) for loss in METHODS if loss in by_loss})
        for model, by_loss in found.items()
    ]


def pooled(per_prompt, names):
    """Per-prompt values averaged over the runs `names` (the same prompts and seeds in every run)."""
    first = per_prompt[names[0]]
    return {col: {c: np.mean([per_prompt[n][col][c] for n in names], axis=0) for c in g} for col, g in first.items()}


def logged(folder, column, step=None):
    """A log.csv value: at `step`, or the last non-empty one."""
    value = None
    with open(os.path.join(folder, "log.csv")) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                if step is None or int(row["step"]) == step:
                    value = float(row[column])
    return value


def curve(folder, column):
    """(steps, values) of a log.csv column, skipping empty rows."""
    steps, values = [], []
    with open(os.path.join(folder, "log.csv")) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                steps.append(int(row["step"]))
                values.append(float(row[column]))
    return np.array(steps), np.array(values)


def cell(value, low=None, high=None, signed=False):
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return (
        text if low is None else f"{text} [{low:+.3f}, {high:+.3f}]" if signed else f"{text} [{low:.2f}, {high:.2f}]"
    )


def model_table(model, protocol, beside="."):
    """The markdown table of one backbone, and a dict of its numbers (for the plain-words answers)."""
    results, per_prompt = protocol["results"], protocol["per_prompt"]
    methods = runs_by_method(results, beside)
    if not methods:
        raise SystemExit(
            f"{model}: no token files named <model>-<loss>-seed<N>/tokens.safetensors in the protocol "
            f"file (shapes/replicate.sh names its runs so)"
        )
    base = per_prompt["base"]
    columns = [c for c in COLUMNS if c in base]
    header = (
        "| " + model + ", " + protocol["set"] + " set | " + " | ".join(columns) + " | held-out acc. | seeds | "
        "steps | wall time per run |"
    )
    lines = [header, "|---" * (len(columns) + 5) + "|"]
    numbers = {"base": checker.ordered(checker.bootstrap_interval(base))}
    any_run = next(iter(methods.values()))[0][1]
    lines.append(
        "| base | "
        + " | ".join(cell(*numbers["base"][c]) for c in columns)
        + f" | {logged(any_run, 'heldout_acc', step=0):.3f} | | | |"
    )
    for loss, runs in methods.items():
        names = [name for _, _, name in runs]
        groups = pooled(per_prompt, names)
        scores = checker.ordered(checker.bootstrap_interval(groups))
        delta = checker.paired_difference(groups, base)
        seed_means = [results[n]["mean"][0] for n in names]
        folders = [folder for _, folder, _ in runs]
        accuracy = np.mean([logged(f, "heldout_acc") for f in folders])
        steps = sorted({int(json.load(open(os.path.join(f, "config.json")))["steps"]) for f in folders})
        walls = {
            seed: float(open(os.path.join(f, "wall_s")).read())
            for seed, f, _ in runs
            if os.path.exists(os.path.join(f, "wall_s"))
        }
        untimed = [f"seed {seed}" for seed, _, _ in runs if seed not in walls]
        wall = []
        if walls:
            wall.append(", ".join(f"{w / 60:.1f}" for w in walls.values()) + " min")
        if untimed:
            wall.append(", ".join(untimed) + " not timed")
        wall = "; ".join(wall)
        numbers[loss] = dict(
            scores=scores,
            delta=delta,
            seed_means=seed_means,
            accuracy=accuracy,
            cos=np.mean([logged(f, "token_cos") for f in folders]),
            change=np.mean([logged(f, "output_change") for f in folders]),
        )
        spread = f"{len(names)} (means {min(seed_means):.3f}-{max(seed_means):.3f})"
        lines.append(
            f"| {NAMES[loss]} | "
            + " | ".join(cell(*scores[c]) for c in columns)
            + f" | {accuracy:.3f} | {spread} | {','.join(map(str, steps))} | {wall} |"
        )
        lines.append(
            f"| Δ {NAMES[loss].split(' (')[0]} − base | "
            + " | ".join(cell(*delta[c], signed=True) for c in columns)
            + " | | | | |"
        )
        if loss != "dsm" and "dsm" in numbers:  # does the alignment loss beat plain score matching?
            numbers[loss]["delta_dsm"] = checker.paired_difference(groups, numbers["dsm"]["groups"])
            lines.append(
                f"| Δ {NAMES[loss]} − dsm | "
                + " | ".join(cell(*numbers[loss]["delta_dsm"][c], signed=True) for c in columns)
                + " | | | | |"
            )
        numbers[loss]["groups"] = groups
    if "softrepa" in numbers and "agsm" in numbers:  # AGSM's claim is against SoftREPA (its Table 1)
        numbers["agsm"]["delta_softrepa"] = checker.paired_difference(
            numbers["agsm"]["groups"], numbers["softrepa"]["groups"]
        )
        lines.append(
            "| Δ AGSM − SoftREPA | "
            + " | ".join(cell(*numbers["agsm"]["delta_softrepa"][c], signed=True) for c in columns)
            + " | | | | |"
        )
    return "\n".join(lines), numbers


def sweep_table(path):
    """A sweep.py CSV as markdown: each run's changed settings, dev mean, paired Δ, over-counting, movement."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    stem = os.path.splitext(os.path.basename(path))[0]  # sweep.py writes <folder>/sweep.csv
    name = stem if stem != "sweep" else os.path.basename(os.path.dirname(os.path.abspath(path)))
    lines = [
        f"| {name}, dev | steps | lr | τ | γ+ / γ− | tokens | layers / blocks | dev mean [95%] | Δ mean vs base "
        f"[95%] | over-count (counting) | held-out acc. | cos to init | output change |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        if r["run"] == "base":
            lines.append(
                f"| base | | | | | | | {float(r['mean']):.3f} "
                f"[{float(r['mean_low']):.3f}, {float(r['mean_high']):.3f}] "
                f"| | {float(r['overcount_counting']):.3f} | | | |"
            )
            continue
        gammas = f"{r['gamma_pos']} / {r['gamma_neg']}" if r.get("loss") == "agsm" else ""  # AGSM's only
        lines.append(
            f"| {r['run']} | {r.get('steps', '')} | {r['lr']} | {r['tau']} | {gammas} | {r['n_tokens']} | "
            f"{r['layers']} {r['blocks']} | "
            f"{float(r['mean']):.3f} [{float(r['mean_low']):.3f}, {float(r['mean_high']):.3f}] | "
            f"{float(r['delta_mean']):+.3f} [{float(r['delta_low']):+.3f}, {float(r['delta_high']):+.3f}] | "
            f"{float(r['overcount_counting']):.3f} | {float(r['heldout_acc']):.3f} | "
            f"{float(r['token_cos']):.2f} | {float(r['output_change']):.3f} |"
        )
    return "\n".join(lines)


def plot(models_runs, path):
    """AGSM Fig. 4 on the shapes world: per backbone, the dev validation score over training steps
    (mean over training seeds, the band their range; one seed: the band is the score's sampling noise, a
    95% binomial interval over the 6 x val_n prompts each scored once), and the token movement (cosine to
    the initial tokens, relative change of the denoiser's output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(models_runs), figsize=(5.2 * len(models_runs), 9.5), squeeze=False)
    for j, (model, methods) in enumerate(models_runs):
        first = next(iter(methods.values()))[0][1]
        val_n = json.load(open(os.path.join(first, "config.json"))).get("val_n", 8)  # prompts per category
        panels = [
            ("score_mean", f"validation mean score (dev, {6 * val_n} prompts)"),
            ("token_cos", "cosine to initial tokens"),
            ("output_change", "relative output change"),
        ]
        for i, (column, label) in enumerate(panels):
            ax = axes[i][j]
            for loss, runs in methods.items():
                curves = [curve(folder, column) for _, folder, _ in runs]
                steps = curves[0][0]
                values = np.array([v for s, v in curves if len(s) == len(steps)])
                (line,) = ax.plot(
                    steps,
                    values.mean(0),
                    marker=".",
                    label=f"{NAMES[loss]} ({len(values)} seed{'s' * (len(values) > 1)})",
                )
                low, high = values.min(0), values.max(0)
                if len(values) == 1 and column == "score_mean":  # one seed: the validation's own noise
                    p = np.clip(values[0], 0, 1)
                    half = 1.96 * np.sqrt(p * (1 - p) / (6 * val_n))
                    low, high = p - half, p + half
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
            ax.set(xlabel="training step", ylabel=label, title=f"{model}: {label}" if i == 0 else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def delta_table(paths, columns=("color_attr", "two_object", "position", "mean")):
    """One row per token file of the protocol JSONs: its paired difference with the base (value [95%])
    in `columns`, and the output change its run logged last (log.csv's output_change)."""
    lines = [
        "| run | " + " | ".join(f"Δ {c}" for c in columns) + " | output change |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for path in paths:
        with open(path) as f:
            results = json.load(f)["results"]
        for name, scores in results.items():
            match = TOKENS.match(name.removesuffix(" - base"))
            if not name.endswith(" - base") or not match:
                continue
            folder = match.group("folder")
            change = ""
            log = os.path.join(folder, "log.csv")
            if os.path.exists(log):
                with open(log) as f:
                    values = [r["output_change"] for r in csv.DictReader(f) if r.get("output_change")]
                change = f"{float(values[-1]):.3f}" if values else ""
            cells = [f"{scores[c][0]:+.3f} [{scores[c][1]:+.3f}, {scores[c][2]:+.3f}]" for c in columns]
            lines.append(f"| {os.path.basename(folder)} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines)


def trainable_numbers(path):
    """The trained numbers a token or LoRA file holds (AGSM files: psi+ alone, what one sample uses)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if not k.startswith(("neg.", "ema_"))]
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys)


def arms_table(
    paths,
    reference,
    columns=(
        "counting",
        "overcount_counting",
        "single_object",
        "overcount_single",
        "two_object",
        "color_attr",
        "position",
        "mean",
    ),
):
    """#26: one protocol JSON per arm (its training seeds' token or LoRA files, one base). Each arm pools its
    seeds prompt by prompt (as model_table does); rows: the arm with 95% intervals, then its paired
    difference with the `reference` arm and with the base, prompt by prompt over the same seeds."""
    arms, base, beside = {}, None, {}
    for path in paths:
        with open(path) as f:
            protocol = json.load(f)
        name = os.path.basename(path).removesuffix(".json").removeprefix("dev-arms-").removeprefix("eval-arms-")
        files = [k for k in protocol["per_prompt"] if k != "base"]
        arms[name] = (pooled(protocol["per_prompt"], files), files, protocol["results"])
        beside[name] = os.path.dirname(path)
        if base is not None and protocol["per_prompt"]["base"] != base:
            raise SystemExit(f"{path}: not the same prompts, seeds and base as the other arms")
        base = protocol["per_prompt"]["base"]
    if reference not in arms:
        raise SystemExit(f"--reference {reference}: no such arm among {', '.join(arms)}")
    head = "| arm | trained numbers | " + " | ".join(columns) + " | seeds' means |"
    lines = [head, "|---" * (len(columns) + 3) + "|"]
    scores = checker.ordered(checker.bootstrap_interval(base))
    lines.append("| base | 0 | " + " | ".join(cell(*scores[c]) if c in scores else "" for c in columns) + " | |")
    for name, (groups, files, results) in arms.items():
        scores = checker.ordered(checker.bootstrap_interval(groups))
        means = [results[f]["mean"][0] for f in files]
        file = files[0].removeprefix("tokens ")  # where it was written, or beside the JSON (docs/results)
        tail = file.split("/")[-2:]  # <run folder>/<file>, beside the JSON or one folder up
        file = next(
            (
                f
                for f in (file, os.path.join(beside[name], *tail), os.path.join(beside[name], "..", *tail))
                if os.path.exists(f)
            ),
            None,
        )
        size = f"{trainable_numbers(file):,}" if file else "?"
        lines.append(
            f"| {name} | {size} | "
            + " | ".join(cell(*scores[c]) if c in scores else "" for c in columns)
            + f" | {len(files)} ({min(means):.3f}-{max(means):.3f}) |"
        )
        against = [("base", base)] + ([(reference, arms[reference][0])] if name != reference else [])
        for label, other in against:
            diff = checker.paired_difference(groups, other)
            lines.append(
                f"| {name} - {label} | | "
                + " | ".join(cell(*diff[c], signed=True) if c in diff else "" for c in columns)
                + " | |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.deltas:
        print(delta_table(args.deltas))
    if args.arms:
        print(arms_table(args.arms, args.reference))
        return None
    tables, models_runs, numbers, protocols = [], [], {}, {}
    for model, path in zip(args.model, args.json):
        with open(path) as f:
            protocol = json.load(f)
        if "per_prompt" not in protocol:
            raise SystemExit(
                f"{path}: no per-prompt values (written by an older eval.py): run eval.py --protocol again"
            )
        if model in protocols:  # a second file of the same model: the same prompts, seeds and base
            first = protocols[model]
            if protocol["set"] != first["set"] or protocol["per_prompt"]["base"] != first["per_prompt"]["base"]:
                raise SystemExit(f"{path}: not the same prompts, seeds and base as the first {model} file")
            first["results"].update(protocol["results"])
            first["per_prompt"].update(protocol["per_prompt"])
        else:
            protocols[model] = protocol
            protocol["beside"] = os.path.dirname(path)
    for model, protocol in protocols.items():
        table, numbers[model] = model_table(model, protocol, protocol["beside"])
        tables.append(table)
        models_runs.append((model, runs_by_method(protocol["results"], protocol["beside"])))
    text = "\n\n".join(tables + [sweep_table(path) for path in args.sweep])
    if text:
        print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(runs_in_folders(args.plot_runs) if args.plot_runs else models_runs, args.plot)
        print(f"wrote {args.plot}")
    return numbers


if __name__ == "__main__":
    main()
