"""report.py: the replication table and the training-dynamics plot of the shapes world, from the run
folders and the protocol JSON that shapes/replicate.sh writes (SoftREPA Table 1 and eqs. 15-18, AGSM
Table 1 and Fig. 4), and the tables of the other experiments (--arms, --deltas, --sweep).

    python -m shapes.report --model tiny-sd3 --json runs/replicate/tiny-sd3-eval.json --plot dynamics.png

One row per method: base, dsm (AGSM Table 4 (i)), SoftREPA, AGSM. A method's score is the mean over its
training seeds, prompts and 4 sampling seeds (eval.py --protocol saves the per-prompt values of every
token file). Every 95% interval comes from two_level_bootstrap: training seeds resampled within each arm,
prompt texts (identical texts one cluster) resampled within each category; a "Δ" row pairs two arms on
the same prompt clusters, and on the same seed indices where both trained on the same seed list. The
held-out classifier accuracy, the token movement and the wall time come from each run's log.csv and wall_s.

Provenance: a table pools or pairs only files made by one code version (the commit a protocol JSON or a
run's config.json records; files from before commits were recorded have their known encoding of the
training images, or "no commit recorded"); --allow-mixed-commits lets it go on and marks each row.
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

import files
import flags
from shapes import checker

METHODS = ["dsm", "softrepa", "agsm"]
NAMES = {"base": "base", "dsm": "dsm (AGSM Table 4 (i))", "softrepa": "SoftREPA", "agsm": "AGSM"}
COLUMNS = [*checker.CATEGORIES, "mean", "overcount_counting", "overcount_single"]
FOLDER = re.compile(r"(?P<model>.+)-(?P<loss>dsm|softrepa|agsm)-seed(?P<seed>\d+)$")  # a run folder's name
TOKENS = re.compile(r"tokens (?P<folder>.*)/tokens\.safetensors$")  # a protocol JSON's key


# -----------------------------------------------------------------------------
# Intervals: a two-level bootstrap (issue #33)
#
# A row's claim is about the method, not about these particular runs and prompts: "train this way (any
# seed) and score on prompts of this kind (any prompt)". Two things behind a row were drawn at random and
# would come out differently if the experiment were run again, so both are resampled:
#   1. The training seed. It fixes the tokens' (or adapters') initialisation, the caption stream and the
#      noise of every step; an arm's runs are draws from the distribution of files the method produces,
#      and their means can differ by more than the prompts explain (LoRA + SoftREPA on the dev set: seed
#      means 0.573-0.673). Averaging the runs prompt by prompt and resampling prompts alone treats the
#      runs as the method itself, and leaves that spread out of the interval.
#   2. The prompt. A category's prompts are draws from the captions of its kind, and whether a text is
#      easy for the checker matters more than anything else in a prompt's value. A text that appears
#      several times (the eval set's counting category has 45 distinct texts among its 80 prompts, single
#      objects and colours 15 each) is one draw of a text, sampled with more image seeds, not several
#      independent prompts: identical texts form one cluster, and whole clusters are resampled within
#      their category (prompt_clusters), so a repeated text cannot pass for independent evidence.
# The 4 sampling seeds of a prompt are not resampled on their own: they are inside the prompt's value,
# and resampling prompts carries their noise (as the outer level of a nested bootstrap does).
# Seeds and prompts are crossed, not nested (every run is scored on every prompt), so the two levels are
# drawn independently and each draw scores its resampled runs on its resampled prompts. Resampling both
# factors of a crossed design counts the seed x prompt interaction at both levels, so with many seeds and
# prompts the interval errs on the wide side (Owen 2007, "The pigeonhole bootstrap").
# Pairing. Two arms scored on the same prompts with the same sampling seeds share each prompt's
# difficulty: a difference uses the same prompt-cluster draws for both, and what they share cancels. Two
# arms trained on the same list of seeds share, seed by seed, the caption stream and the step noise, so
# their runs are drawn by seed index for both; arms with different seed lists (the base, never trained,
# is one run) draw their runs independently.
# With few seeds it errs the other way. A resample of 3 runs has 10 distinct outcomes, and the bootstrap
# variance of a mean of S runs is (S - 1) / S of the runs' variance over S, with normal-like rather than
# t-like tails; where the seeds' variance dominates, the interval is too narrow (bootstrap_coverage
# measures by how much: 78% coverage at 3 seeds, 93% at 20, where averaging the runs first gave 29%).
BOOTSTRAP_DRAWS = 4000
BOOTSTRAP_SEED = 0


def prompt_clusters(protocol):
    """{category: (P,) ints}: which prompts of a protocol file share a text. eval.py --protocol scores the
    first P prompts of each category of shapes/data/{dev,eval}.jsonl (--n-per-category P), in that order,
    so the texts follow from the set and each category's number of values."""
    import shapes

    records = shapes.load_eval_set() if protocol["set"] == "eval" else shapes.load_dev_set()
    lengths = {}
    for per_category in protocol["per_prompt"]["base"].values():
        for category, values in per_category.items():
            lengths[category] = len(values)
    clusters = {}
    for category, n in lengths.items():
        texts = [r["prompt"] for r in records if r["spec"]["category"] == category][:n]
        if len(texts) != n:
            raise SystemExit(
                f"{n} {category} prompts in a protocol file but {len(texts)} in the {protocol['set']} set: "
                f"the file was not made from shapes/data/{protocol['set']}.jsonl as it is now"
            )
        ids = {}
        clusters[category] = np.array([ids.setdefault(t, len(ids)) for t in texts])
    return clusters


def resample_counts(n, draws, rng):
    """(draws, n): how often each of n items is picked in each of `draws` resamples of n with replacement."""
    picks = rng.integers(0, n, size=(draws, n)) + n * np.arange(draws)[:, None]  # row r counts in [r n, (r+1) n)
    return np.bincount(picks.ravel(), minlength=draws * n).reshape(draws, n).astype(float)


def two_level_bootstrap(arm, clusters, against=None, draws=BOOTSTRAP_DRAWS, seed=BOOTSTRAP_SEED):
    """{column: (value, low, high)}: the arm's score, or with `against` the difference arm - against,
    and its 95% percentile interval, training seeds and prompt clusters resampled (see above).

    arm, against: {training seed: per-prompt groups} ({column: {category: values (P,)}}), one entry per
    run (the base: one entry); clusters: {category: (P,) ints} (prompt_clusters). A column's value is the
    mean over its categories of the mean over prompts of the mean over runs. The draws come from `seed`
    alone, so every row of a table (and every table) uses the same prompt draws, and an arm the same run
    draws whatever it is paired with."""
    for category, ids in clusters.items():
        for groups in list(arm.values()) + list((against or {}).values()):
            for per_category in groups.values():
                if category in per_category and len(per_category[category]) != len(ids):
                    raise SystemExit(
                        f"{category}: {len(per_category[category])} per-prompt values for {len(ids)} prompts: "
                        f"pair only files scored on the same prompt set and --n-per-category"
                    )
    # prompt level: each category's clusters resampled; a prompt weighs as often as its cluster is drawn
    rng = np.random.default_rng([seed, 0])
    prompt_weights = {}
    for category in sorted(clusters):
        ids = clusters[category]
        prompt_weights[category] = resample_counts(ids.max() + 1, draws, rng)[:, ids]  # (draws, P)
    # seed level: the arm's runs, and the other arm's, by index where they trained on the same seed list
    arm_runs = resample_counts(len(arm), draws, np.random.default_rng([seed, 1]))  # (draws, S)
    if against is None:
        other_runs = None
    elif sorted(against) == sorted(arm) and len(arm) > 1:
        other_runs = arm_runs
    else:
        other_runs = resample_counts(len(against), draws, np.random.default_rng([seed, 2]))

    def per_prompt(runs, run_weights, column, category):
        """(point (P,), draws (draws, P)): each prompt's mean over the runs, plain and per resample."""
        values = np.stack([np.asarray(runs[s][column][category], float) for s in sorted(runs)])  # (S, P)
        return values.mean(0), run_weights @ values / run_weights.sum(1, keepdims=True)

    out = {}
    first = arm[sorted(arm)[0]]
    for column, per_category in first.items():
        if against is not None and column not in against[sorted(against)[0]]:
            continue
        points, boots = [], []
        for category in per_category:
            point, boot = per_prompt(arm, arm_runs, column, category)
            if against is not None:
                other_point, other_boot = per_prompt(against, other_runs, column, category)
                point, boot = point - other_point, boot - other_boot
            weights = prompt_weights[category]
            points.append(point.mean())
            boots.append((weights * boot).sum(1) / weights.sum(1))
        boots = np.mean(boots, axis=0)
        out[column] = (float(np.mean(points)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
    return checker.ordered(out)


def bootstrap_coverage(seeds, repeats=300, prompts=40, seed_sd=0.05, prompt_sd=0.1, cell_sd=0.03, draws=1000):
    """(two-level, prompts-only): how often the 95% interval of a difference holds the true one, over
    `repeats` synthetic experiments whose training seeds' spread dominates. Each: an arm of `seeds` runs
    (true mean 0.6, a seed effect N(0, seed_sd), shared prompt effects N(0, prompt_sd), per-run-and-prompt
    noise N(0, cell_sd)) paired with a base of one run (true mean 0.5, the same prompts); "prompts-only"
    averages the runs prompt by prompt first, as report.py did before #33."""
    rng = np.random.default_rng(1)
    clusters, held = {"counting": np.arange(prompts)}, np.zeros(2)
    for _ in range(repeats):
        prompt_effect = rng.normal(0, prompt_sd, prompts)
        run = lambda mean, effect=prompt_effect: {
            "mean": {"counting": mean + effect + rng.normal(0, cell_sd, prompts)}
        }
        arm = {s: run(0.6 + rng.normal(0, seed_sd)) for s in range(seeds)}
        base = {"base": run(0.5)}
        averaged = {0: {"mean": {"counting": np.mean([r["mean"]["counting"] for r in arm.values()], axis=0)}}}
        for i, runs in enumerate((arm, averaged)):
            _, low, high = two_level_bootstrap(runs, clusters, base, draws=draws)["mean"]
            held[i] += low <= 0.1 <= high
    return tuple(float(h) for h in held / repeats)


def training_seed(name, index):
    """The training seed in a token file's run folder name (...-seed<N>/file), else its position."""
    match = re.search(r"seed(\d+)/[^/]+$", name)
    return int(match[1]) if match else index


# -----------------------------------------------------------------------------
# Provenance: which code made a file (issue #33)
#
# Numbers made by different code are not draws of one experiment: between 88f1f74 (the #25 batch) and
# 2ce3909, step.encode_batch switched from a sample of the VAE posterior to its mean, so the replication,
# tau, layers, capacity and length runs trained on other latents than the #26 arms. A table therefore
# pools or pairs files of one code version only. The version is the commit a protocol JSON records
# ("commit", with "dirty": true when the tree had changes), joined with the commits its runs' config.json
# record; the files committed before commits were recorded carry what is known of them.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTERIOR_SAMPLE = "no commit recorded; runs trained before 2ce3909, images encoded by sampling the VAE posterior"
POSTERIOR_MEAN = "no commit recorded; runs trained after 2ce3909, images encoded by the VAE posterior's mean"
UNRECORDED = [  # (a protocol file's path from the repo root, fnmatch pattern; what is known), first match wins
    ("docs/results/arms/*", POSTERIOR_MEAN),  # #26's arms: 032036e and a78590c
    ("docs/quickstart-protocol.json", POSTERIOR_MEAN),  # the quick start rerun at 10e6284
    ("docs/results/*", POSTERIOR_SAMPLE),  # #25's batch at 88f1f74: replication, tau, layers, capacity, length
    ("docs/replicate/*", POSTERIOR_SAMPLE),  # the previous bases (8ab54d3)
    ("docs/sweep/*", POSTERIOR_SAMPLE),
]


def recorded_commit(record):
    """'<commit>' or '<commit> with uncommitted changes' from a protocol JSON or config.json; None if absent."""
    commit = record.get("commit")
    return commit and commit + (" with uncommitted changes" if record.get("dirty") else "")


def code_version(protocol, path, folders=()):
    """One line naming the code behind a protocol file's numbers for the runs in `folders`: the file's
    commit, or what is known of it (UNRECORDED), joined with the commits its runs' config.json record
    where those differ. A run without a commit shares an unrecorded file's label (the known split is per
    file); beside a recorded file it is "no commit recorded"."""
    from fnmatch import fnmatch

    recorded = recorded_commit(protocol)
    where = os.path.relpath(os.path.abspath(path), REPO)
    version = recorded or next(
        (known for pattern, known in UNRECORDED if fnmatch(where, pattern)), "no commit recorded"
    )
    trained = set()
    for folder in folders:
        config = os.path.join(folder, "config.json")
        if os.path.exists(config):
            with open(config) as f:
                trained.add(recorded_commit(json.load(f)) or ("no commit recorded" if recorded else version))
    if trained and trained != {version}:
        version = f"protocol {version}; runs {', '.join(sorted(trained))}"
    return version


def version_marks(versions, allow_mixed, what):
    """versions: {row: version} of the rows a table pools and pairs -> ({row: mark}, the note under the
    table). One version: no marks, the note names it. Several: a one-line refusal, unless allow_mixed:
    then each row is marked with its version's letter and the note is the legend."""
    distinct = sorted(set(versions.values()))
    if len(distinct) == 1:
        return {row: "" for row in versions}, f"Code: {distinct[0]}."
    if not allow_mixed:
        listing = "; ".join(f"{v}: {', '.join(r for r in versions if versions[r] == v)}" for v in distinct)
        raise SystemExit(
            f"{what}: files made by different code ({listing}); rerun them on one commit, or pass "
            f"--allow-mixed-commits to pool and pair them anyway (each row then marked)"
        )
    letters = {v: chr(ord("a") + i) for i, v in enumerate(distinct)}
    note = "Mixed code: " + "; ".join(f"({letters[v]}) {v}" for v in distinct) + "."
    return {row: f" ({letters[v]})" for row, v in versions.items()}, note


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
    p.add_argument(
        "--columns",
        nargs="+",
        default=["color_attr", "two_object", "position", "mean"],
        help="--deltas: the columns of its table",
    )
    p.add_argument(
        "--sweep-json",
        nargs="*",
        default=[],
        help="--sweep: the protocol JSON of each CSV (its per-prompt values), for the intervals of the "
        "two-level bootstrap instead of the CSV's",
    )
    p.add_argument(
        "--allow-mixed-commits",
        action="store_true",
        help="pool and pair files made by different code (marked in the table) instead of refusing",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.sweep_json and len(args.sweep_json) != len(args.sweep):
        p.error(f"{len(args.sweep)} --sweep but {len(args.sweep_json)} --sweep-json: give one JSON per CSV")
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


def model_table(model, protocol, beside=".", allow_mixed=False):
    """The markdown table of one backbone, and a dict of its numbers (for the plain-words answers).
    protocol["versions"]: {per-prompt key: code version} (main fills it; one file: code_version's)."""
    results, per_prompt = protocol["results"], protocol["per_prompt"]
    methods = runs_by_method(results, beside)
    if not methods:
        raise SystemExit(
            f"{model}: no token files named <model>-<loss>-seed<N>/tokens.safetensors in the protocol "
            f"file (shapes/replicate.sh names its runs so)"
        )
    clusters = prompt_clusters(protocol)
    base = {"base": per_prompt["base"]}
    versions = protocol.get("versions") or {name: "no commit recorded" for name in per_prompt}
    rows = {"base": versions["base"]}
    for loss, runs in methods.items():
        rows[NAMES[loss]] = " + ".join(sorted({versions[name] for _, _, name in runs}))
    marks, note = version_marks(rows, allow_mixed, f"{model}, {protocol['set']} set")
    columns = [c for c in COLUMNS if c in per_prompt["base"]]
    header = (
        "| " + model + ", " + protocol["set"] + " set | " + " | ".join(columns) + " | held-out acc. | seeds | "
        "steps | wall time per run |"
    )
    lines = [header, "|---" * (len(columns) + 5) + "|"]
    numbers = {"base": two_level_bootstrap(base, clusters)}
    any_run = next(iter(methods.values()))[0][1]
    lines.append(
        f"| base{marks['base']} | "
        + " | ".join(cell(*numbers["base"][c]) for c in columns)
        + f" | {logged(any_run, 'heldout_acc', step=0):.3f} | | | |"
    )

    def difference_row(label, difference):
        return f"| {label} | " + " | ".join(cell(*difference[c], signed=True) for c in columns) + " | | | | |"

    for loss, runs in methods.items():
        names = [name for _, _, name in runs]
        seeds = {seed: per_prompt[name] for seed, _, name in runs}  # the arm's runs, by training seed
        scores = two_level_bootstrap(seeds, clusters)
        delta = two_level_bootstrap(seeds, clusters, base)
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
        name = NAMES[loss]
        lines.append(
            f"| {name}{marks[name]} | "
            + " | ".join(cell(*scores[c]) for c in columns)
            + f" | {accuracy:.3f} | {spread} | {','.join(map(str, steps))} | {wall} |"
        )
        lines.append(difference_row(f"Δ {name.split(' (')[0]} − base", delta))
        if loss != "dsm" and "dsm" in numbers:  # does the alignment loss beat plain score matching?
            numbers[loss]["delta_dsm"] = two_level_bootstrap(seeds, clusters, numbers["dsm"]["runs"])
            lines.append(difference_row(f"Δ {name} − dsm", numbers[loss]["delta_dsm"]))
        numbers[loss]["runs"] = seeds
    if "softrepa" in numbers and "agsm" in numbers:  # AGSM's claim is against SoftREPA (its Table 1)
        numbers["agsm"]["delta_softrepa"] = two_level_bootstrap(
            numbers["agsm"]["runs"], clusters, numbers["softrepa"]["runs"]
        )
        lines.append(difference_row("Δ AGSM − SoftREPA", numbers["agsm"]["delta_softrepa"]))
    lines += ["", note]
    return "\n".join(lines), numbers


# the columns of sweep.py's CSV that a sweep table reads
SWEEP_COLUMNS = ["run", "mean", "mean_low", "mean_high", "delta_mean", "delta_low", "delta_high", "overcount_counting"]
SWEEP_COLUMNS += ["lr", "tau", "n_tokens", "layers", "blocks", "heldout_acc", "token_cos", "output_change"]


def sweep_table(path, protocol_path=None, allow_mixed=False):
    """A sweep.py CSV as markdown: each run's changed settings, dev mean, paired Δ, over-counting, movement.
    With the sweep's protocol JSON (`protocol_path`), the two intervals are two_level_bootstrap's (one run
    per setting: the prompt clusters alone) instead of the CSV's prompts-only ones."""
    rows = files.read_csv(path, "a sweep.csv written by python -m shapes.sweep", SWEEP_COLUMNS)
    stem = os.path.splitext(os.path.basename(path))[0]  # sweep.py writes <folder>/sweep.csv
    name = stem if stem != "sweep" else os.path.basename(os.path.dirname(os.path.abspath(path)))
    intervals, note = {}, None
    if protocol_path:
        with open(protocol_path) as f:
            protocol = json.load(f)
        clusters, per_prompt = prompt_clusters(protocol), protocol["per_prompt"]
        base = {"base": per_prompt["base"]}
        keys = {"base": "base"} | {r["run"]: k for k in per_prompt for r in rows if f"/{r['run']}/" in k}
        missing = [r["run"] for r in rows if r["run"] not in keys]
        if missing:
            raise SystemExit(f"--sweep-json {protocol_path}: no per-prompt values of {', '.join(missing)}")
        for run, key in keys.items():
            arm = {0: per_prompt[key]} if run != "base" else base
            intervals[run] = (two_level_bootstrap(arm, clusters)["mean"], two_level_bootstrap(arm, clusters, base))
        _, note = version_marks({run: code_version(protocol, protocol_path) for run in keys}, allow_mixed, name)

    def mean_cell(r):
        value, low, high = intervals[r["run"]][0] if intervals else (r["mean"], r["mean_low"], r["mean_high"])
        return f"{float(value):.3f} [{float(low):.3f}, {float(high):.3f}]"

    def delta_cell(r):
        value, low, high = (
            intervals[r["run"]][1]["mean"] if intervals else (r["delta_mean"], r["delta_low"], r["delta_high"])
        )
        return f"{float(value):+.3f} [{float(low):+.3f}, {float(high):+.3f}]"

    lines = [
        f"| {name}, dev | steps | lr | τ | γ+ / γ− | tokens | layers / blocks | dev mean [95%] | Δ mean vs base "
        f"[95%] | over-count (counting) | held-out acc. | cos to init | output change |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        if r["run"] == "base":
            lines.append(f"| base | | | | | | | {mean_cell(r)} | | {float(r['overcount_counting']):.3f} | | | |")
            continue
        gammas = f"{r['gamma_pos']} / {r['gamma_neg']}" if r.get("loss") == "agsm" else ""  # AGSM's only
        lines.append(
            f"| {r['run']} | {r.get('steps', '')} | {r['lr']} | {r['tau']} | {gammas} | {r['n_tokens']} | "
            f"{r['layers']} {r['blocks']} | {mean_cell(r)} | {delta_cell(r)} | "
            f"{float(r['overcount_counting']):.3f} | {float(r['heldout_acc']):.3f} | "
            f"{float(r['token_cos']):.2f} | {float(r['output_change']):.3f} |"
        )
    if note:
        lines += ["", note]
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
    try:
        files.write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # atomic: never half a PNG
    finally:
        plt.close(fig)


def beside_json(path, json_path):
    """A file a protocol JSON names (where it was written), or the same run folder and file beside the
    JSON or one folder up (the runs copied into docs/results); None if none exists."""
    tail = path.split("/")[-2:]  # <run folder>/<file>
    candidates = (
        path,
        os.path.join(os.path.dirname(json_path), *tail),
        os.path.join(os.path.dirname(json_path), "..", *tail),
    )
    return next((f for f in candidates if os.path.exists(f)), None)


def delta_table(paths, columns=("color_attr", "two_object", "position", "mean"), allow_mixed=False):
    """One row per token file of the protocol JSONs ("<run> − base"): its paired difference with the
    base (value [95%], two_level_bootstrap with one run: the prompt clusters) in `columns`, and the output
    change its run logged last (log.csv's output_change); first the base of each file (once if shared)."""
    lines = [
        "| run | " + " | ".join(columns) + " | output change |",
        "|---" * (len(columns) + 2) + "|",
    ]
    rows, versions, bases = [], {}, []
    for path in paths:
        with open(path) as f:
            protocol = json.load(f)
        clusters, per_prompt = prompt_clusters(protocol), protocol["per_prompt"]
        base = {"base": per_prompt["base"]}
        if base not in bases:
            bases.append(base)
            scores = two_level_bootstrap(base, clusters)
            label = f"base ({os.path.basename(path)})"
            versions[label] = code_version(protocol, path)
            rows.append((label, [cell(*scores[c]) for c in columns], ""))
        for name in per_prompt:
            match = TOKENS.match(name)
            if not match:
                continue
            file = beside_json(name.removeprefix("tokens "), path)
            folder = os.path.dirname(file) if file else match.group("folder")
            change = ""
            if os.path.exists(os.path.join(folder, "log.csv")):
                with open(os.path.join(folder, "log.csv")) as f:
                    values = [r["output_change"] for r in csv.DictReader(f) if r.get("output_change")]
                change = f"{float(values[-1]):.3f}" if values else ""
            delta = two_level_bootstrap({0: per_prompt[name]}, clusters, base)
            label = f"{os.path.basename(match.group('folder'))} − base"
            versions[label] = code_version(protocol, path, [folder])
            rows.append((label, [cell(*delta[c], signed=True) for c in columns], change))
    marks, note = version_marks(versions, allow_mixed, "--deltas")
    for label, cells, change in rows:
        lines.append(f"| {label}{marks[label]} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines + ["", note])


def trainable_numbers(path):
    """The trained numbers a token or LoRA file holds (AGSM files: psi+ alone, what one sample uses)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if not k.startswith(("neg.", "ema_"))]
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys)


ARM_PREFIXES = ("dev-arms-", "eval-arms-", "dev-", "eval-")  # a protocol file's name is its arm's, after these


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
    allow_mixed=False,
):
    """#26: one protocol JSON per arm (its training seeds' token or LoRA files, one base). Rows: each arm
    over its seeds with 95% intervals, then its paired difference with the `reference` arm and with the
    base; every interval two_level_bootstrap's (training seeds and prompt clusters)."""
    arms, base, versions, numbers = {}, None, {}, {}
    for path in paths:
        with open(path) as f:
            protocol = json.load(f)
        name = os.path.basename(path).removesuffix(".json")
        name = name.removeprefix(next((p for p in ARM_PREFIXES if name.startswith(p)), ""))
        files = [k for k in protocol["per_prompt"] if k != "base"]
        runs = {training_seed(k, i): protocol["per_prompt"][k] for i, k in enumerate(files)}
        located = [beside_json(k.removeprefix("tokens "), path) for k in files]
        arms[name] = (runs, files, protocol["results"], located[0])
        versions[name] = code_version(protocol, path, [os.path.dirname(f) for f in located if f])
        if base is not None and protocol["per_prompt"]["base"] != base:
            raise SystemExit(f"{path}: not the same prompts, seeds and base as the other arms")
        base = protocol["per_prompt"]["base"]
        clusters = prompt_clusters(protocol)
    if reference not in arms:
        raise SystemExit(f"--reference {reference}: no such arm among {', '.join(arms)}")
    marks, note = version_marks(versions, allow_mixed, "--arms")
    base = {"base": base}
    head = "| arm | trained numbers | " + " | ".join(columns) + " | seeds' means |"
    lines = [head, "|---" * (len(columns) + 3) + "|"]
    numbers["base"] = two_level_bootstrap(base, clusters)
    lines.append(
        "| base | 0 | "
        + " | ".join(cell(*numbers["base"][c]) if c in numbers["base"] else "" for c in columns)
        + " | |"
    )
    for name, (runs, files, results, file) in arms.items():
        scores = two_level_bootstrap(runs, clusters)
        means = [results[f]["mean"][0] for f in files]
        size = f"{trainable_numbers(file):,}" if file else "?"
        lines.append(
            f"| {name}{marks[name]} | {size} | "
            + " | ".join(cell(*scores[c]) if c in scores else "" for c in columns)
            + f" | {len(files)} ({min(means):.3f}-{max(means):.3f}) |"
        )
        numbers[name] = {"scores": scores}
        against = [("base", base)] + ([(reference, arms[reference][0])] if name != reference else [])
        for label, other in against:
            diff = two_level_bootstrap(runs, clusters, other)
            numbers[name][label] = diff
            lines.append(
                f"| {name} - {label} | | "
                + " | ".join(cell(*diff[c], signed=True) if c in diff else "" for c in columns)
                + " | |"
            )
    return "\n".join(lines + ["", note]), numbers


def main(argv=None):
    args = parse_args(argv)
    printed = []
    if args.deltas:
        printed.append(delta_table(args.deltas, args.columns, args.allow_mixed_commits))
    if args.arms:
        table, arm_numbers = arms_table(args.arms, args.reference, allow_mixed=args.allow_mixed_commits)
        printed.append(table)
    tables, models_runs, numbers, protocols = [], [], {}, {}
    if args.arms:
        numbers["arms"] = arm_numbers
    for model, path in zip(args.model, args.json):
        with open(path) as f:
            protocol = json.load(f)
        if "per_prompt" not in protocol:
            raise SystemExit(
                f"{path}: no per-prompt values (written by an older eval.py): run eval.py --protocol again"
            )
        beside = os.path.dirname(path)
        methods = runs_by_method(protocol["results"], beside)
        versions = {"base": code_version(protocol, path)}
        for runs in methods.values():
            for _, folder, name in runs:
                versions[name] = code_version(protocol, path, [folder])
        if model in protocols:  # a second file of the same model: the same prompts, seeds and base
            first = protocols[model]
            if protocol["set"] != first["set"] or protocol["per_prompt"]["base"] != first["per_prompt"]["base"]:
                raise SystemExit(f"{path}: not the same prompts, seeds and base as the first {model} file")
            first["results"].update(protocol["results"])
            first["per_prompt"].update(protocol["per_prompt"])
            first["versions"].update({k: v for k, v in versions.items() if k != "base"})
        else:
            protocols[model] = protocol
            protocol["beside"], protocol["versions"] = beside, versions
    for model, protocol in protocols.items():
        table, numbers[model] = model_table(model, protocol, protocol["beside"], args.allow_mixed_commits)
        tables.append(table)
        models_runs.append((model, runs_by_method(protocol["results"], protocol["beside"])))
    sweeps = [
        sweep_table(path, (args.sweep_json or [None] * len(args.sweep))[i], args.allow_mixed_commits)
        for i, path in enumerate(args.sweep)
    ]
    text = "\n\n".join(printed + tables + sweeps)
    if text:
        print(text)
    if args.markdown:
        files.write_text(args.markdown, text + "\n")
    if args.plot:
        plot(runs_in_folders(args.plot_runs) if args.plot_runs else models_runs, args.plot)
        print(f"wrote {args.plot}")
    return numbers


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
