"""
eval.py: the papers' evaluation on folders of images written by sample.py / edit.py, one table; and
the shapes world's protocol with statistical power.

    python eval.py --runs runs/base runs/softrepa-seed0 runs/softrepa-seed1 --plot
    python eval.py --runs out/sd3 --metrics clip pickscore imagereward hps fid lpips --ref coco/val5k
    python eval.py --runs out/pnp/plain out/pnp/tokens --metrics edit imagereward pickscore hps --bench PIE-Bench_v1
    python eval.py --to-geneval out/sd3 --geneval-prompts geneval/prompts/evaluation_metadata.jsonl
    python eval.py --runs out/sd3-geneval2 --metrics soft-tifa --geneval2 GenEval2/geneval2_data.jsonl \
        --vqa-model weights/Qwen3-VL-8B-Instruct
    python eval.py --protocol dev --model tiny-sd3 --tokens runs/agsm/tokens.safetensors   # shapes world

What is measured (SoftREPA Tables 1-2, AGSM Tables 1-2, Figures 4-5):
  shapes        the shapes world's exact GenEval-style checker (checker.score) per category, offline
  classifier    held-out diffusion-classifier accuracy of the backbone + the run's tokens (--model):
                the true caption must have the lowest denoising error among K (classifier.py,
                SoftREPA eqs. 15-18)
  geneval       GenEval per category: its folder layout written out, its scorer's results jsonl read back
  soft-tifa     GenEval 2 (arXiv 2512.16853) in-process: a VQA model's probability of each atom's correct
                answer, Soft-TIFA AM and GM, AM per skill and GM per atom count (metrics.soft_tifa_scores);
                the model is any transformers image-text-to-text folder (--vqa-model), the prompts --geneval2
  tifa, vqascore  GenEval 2's other two methods, from the same model: hard TIFA (an atom right when the most
                likely answer token is a spelling of the answer) and VQAScore (P("Yes") to 'Does this image
                show "<prompt>"?'). Every atom's score goes into the JSON beside the aggregates, under
                "geneval2": per seed and variant, each method's list over the benchmark's prompts of their
                atoms' scores, as GenEval 2's evaluation.py writes score_lists.json, with the VQA model's folder
                name and the transformers and torch versions
  clip, pickscore, imagereward, hps, fid, lpips: metrics.py; edit: the editing benchmarks' (benchmarks.py)
Heavy metric models are optional (pip install -r requirements-eval.txt); they load from the Hugging
Face hub, or only from --weights DIR when it is given: DIR/<hub id, or its last part> for the CLIP
models and DINO (metrics.HUB), DIR/HPS_v2.1_compressed.pt, DIR/ImageReward.pt + med_config.json, and
torchvision / pytorch-fid files in DIR/checkpoints/. A metric that cannot load is skipped with one line.

--protocol dev|eval (checker.py): every prompt of shapes/data/{dev,eval}.jsonl, 4 seeds fixed by rule,
plain and with each --tokens file; each category, the mean and the over-counting rates with 95% bootstrap
intervals over prompts, a grid (first prompt per category, plain | tokens, same seeds), and the JSON with
the per-prompt values. Choose on the dev set; the eval set is for the final measurement.

Rows: one per run folder and sample.py "variant" (--compare writes "plain" and "tokens" into one folder).
+- is the std over the record seeds of a folder (sample.py --seed 0 1 2); "-seedN" folders share a row.
The table shows ImageReward, HPS, LPIPS and SSIM x100 and structure distance x1000, as the papers do;
the JSON (--json) holds the raw values. Values are cached per folder in eval_metrics.json.
"""

import argparse
import csv
import glob
import json
import os
import re
import shutil

import numpy as np
import torch
from tqdm import tqdm

import benchmarks
import data
import files
import flags
import metrics
import models
import sampler
import shapes
import trained
from run import provenance
from shapes import backbones, checker, classifier

ALL_METRICS = ["shapes", "classifier", "geneval"] + list(metrics.GENEVAL2_METRICS) + ["edit"] + list(metrics.METRICS)
DISPLAY_SCALE = {
    "imagereward": 100,
    "hps": 100,
    "lpips": 100,
    "bg_lpips": 100,
    "bg_ssim": 100,
    "structure_distance": 1000,
    **{column: 100 for column in metrics.GENEVAL2_COLUMNS},  # GenEval 2 prints its scores x100
}


# -----------------------------------------------------------------------------
# Run folders


def read_records(run):
    """sample.py's records.jsonl: one {"image", "prompt", "seed", "variant", "spec", "tokens", ...} per image."""
    path = os.path.join(run, "records.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    for n, record in data.json_lines(path, "a record written by sample.py"):
        if "image" not in record:
            raise SystemExit(f'{path}:{n}: a record needs an "image" path (written by sample.py)')
        records.append(record)
    return records


# -----------------------------------------------------------------------------
# GenEval: its folder layout out, its scorer's results back


def write_geneval(images_by_prompt, metadata, outdir):
    """<outdir>/<00000>/metadata.jsonl (the prompt's line of evaluation_metadata.jsonl) and
    samples/<0000>.png, so GenEval's evaluation/evaluate_images.py runs on it unchanged."""
    for n, meta in enumerate(metadata):
        paths = images_by_prompt.get(meta["prompt"], [])
        if not paths:
            raise SystemExit(
                f"no image for GenEval prompt {n} {meta['prompt']!r}: sample every prompt of the metadata file first"
            )
        folder = os.path.join(outdir, f"{n:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        files.write_text(os.path.join(folder, "metadata.jsonl"), json.dumps(meta) + "\n")
        for k, path in enumerate(paths):
            target = os.path.join(folder, "samples", f"{k:04d}.png")
            if path.lower().endswith(".png"):
                files.write(target, lambda tmp, source=path: shutil.copyfile(source, tmp))
            else:
                files.save_image(metrics.to_pil(metrics.load_image(path)), target)


def read_geneval(path):
    """GenEval's results jsonl -> {geneval_<tag>: fraction correct, geneval_mean: mean over tags}
    (its summary_scores.py: the overall score averages the task scores)."""
    by_tag = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
    scores = {f"geneval_{tag}": float(np.mean(v)) for tag, v in by_tag.items()}
    scores["geneval_mean"] = float(np.mean(list(scores.values())))
    return scores


# -----------------------------------------------------------------------------
# Metrics of a run folder


def token_handle(bb, record):
    """The run's soft tokens attached to bb as sample.py attached them, or None for a plain run."""
    if not record.get("tokens") or record.get("variant") == "plain":
        return None
    return trained.attach(bb, trained.read(record["tokens"], bb.name, ema=record.get("token_set") == "ema_pos"))


def classifier_records(n_per_category, which="eval"):
    """The first n prompts of each category of the eval (or dev) set; 0: all of them."""
    return shapes.first_per_category(
        shapes.load_eval_set() if which == "eval" else shapes.load_dev_set(), n_per_category
    )


def replicate_metrics(run, metric, rows, variant_rows, first, scorers, args, suffix):
    """{column: value} of one metric on one replicate (a folder's images of one variant and seed), or
    None where it does not apply. Folder-level metrics (GenEval, classifier, PIE-Bench) go to the first seed."""
    if metric == "shapes":
        rows = [r for r in rows if "spec" in r]
        images = [metrics.load_image(os.path.join(run, r["image"])) for r in rows]
        return (
            {f"shapes_{k}": v for k, v in checker.score(images, [r["spec"] for r in rows]).items()} if rows else None
        )
    if metric in ("geneval", "classifier", "edit") and not first:
        return None
    if metric == "geneval":
        path = os.path.join(run, f"geneval_results{suffix}.jsonl")
        return read_geneval(path) if os.path.exists(path) else None
    if metric == "classifier":
        bb = scorers["classifier"]
        handle = token_handle(bb, variant_rows[0]) if variant_rows else None
        try:
            return {
                "classifier": classifier.classifier_accuracy(
                    bb, classifier_records(args.classifier_n), args.candidates, handle=handle
                )
            }
        finally:
            if handle is not None:
                handle.remove()
    if metric == "edit":
        return benchmarks.edit_metrics(benchmarks.items(args.pie, run), **scorers["edit"])
    if scorers.get(metric) is None:
        return None
    paths, prompts = [os.path.join(run, r["image"]) for r in rows], [r["prompt"] for r in rows]
    if not rows and args.pie:  # an edit.py folder: the benchmark's target prompts
        items = benchmarks.items(args.pie, run)
        paths, prompts = [it[2] for it in items], [it[4] for it in items]
    return metrics.generation_metric(metric, scorers[metric], paths, prompts, args.ref) if paths else None


def nothing_scored(args):
    """The one line when no run gave a single number: the real cause, found in the first run's records."""
    for run in args.runs:
        records = read_records(run)
        if not records and not args.pie:
            return (
                f"{run}: no records.jsonl, so no images to score: pass folders written by sample.py "
                f"(records.jsonl + images), or edit.py --bench folders with --bench DIR"
            )
        if records and args.metrics in (["shapes"], ["shapes", "geneval"]) and not any("spec" in r for r in records):
            return (
                f"{run}: its {len(records)} records carry no shapes spec, so the shapes metric has nothing to "
                f"check (and there are no GenEval results): sample a shapes prompt set "
                f"(sample.py --prompts shapes/data/eval.jsonl), or pass --metrics {' / '.join(metrics.METRICS)}"
            )
    return (
        f"none of --metrics {' '.join(args.metrics)} applies to {' '.join(args.runs)}: shapes needs records with a "
        f"spec, geneval its results file, edit --bench DIR, fid / lpips --ref DIR"
    )


def geneval2_replicate(run, rows, wanted, done, scorer):
    """GenEval 2's metrics among `wanted` that one replicate's cache entry `done` lacks, from one pass over its
    images (soft and hard TIFA read the same forward passes): each metric's columns, and its score lists
    (evaluation.py's score_lists.json) under done["score_lists"]. Each image is found by its record's prompt."""
    missing = [m for m in wanted if m in metrics.GENEVAL2_METRICS and m not in done]
    if not missing or scorer is None:
        return
    methods = [metrics.GENEVAL2_METRICS[m] for m in missing]
    paths, prompts = [os.path.join(run, r["image"]) for r in rows], [r["prompt"] for r in rows]
    lists = metrics.geneval2_score_lists(scorer, paths, prompts, methods)
    if lists is None:  # no image of a benchmark prompt
        return
    for metric, method in zip(missing, methods):
        done[metric] = metrics.geneval2_columns(method, lists[method], scorer[0])
    done.setdefault("score_lists", {}).update(lists)


def replicates(run, wanted, scorers, args):
    """[(variant, seed, {column: value}, {GenEval 2 method: score lists})] of one run folder, reusing
    <run>/eval_metrics.json."""
    records = read_records(run)
    cache_path = os.path.join(run, "eval_metrics.json")
    # the settings a cached value depends on: a cache computed with others is stale, not reusable
    settings = {k: getattr(args, k, None) for k in ("model", "classifier_n", "candidates", "ref", "pie")}
    # GenEval 2's files count only when given, so that caches written before these flags existed stay valid;
    # with them, the library versions (in bf16 a transformers version moves the atoms' probabilities)
    settings.update({k: v for k in ("geneval2", "vqa_model") if (v := getattr(args, k, None))})
    if getattr(args, "vqa_model", None):
        versions = metrics.geneval2_versions(args.vqa_model)
        settings.update(transformers=versions["transformers"], torch=versions["torch"])
    cache = {}
    if not args.recompute and os.path.exists(cache_path):
        cache = files.read_json(cache_path, "eval.py's cache of this run's scores (delete it, or pass --recompute)")
        if cache.get("_settings") != settings:
            cache = {}
    cache["_settings"] = settings
    variants = sorted({r.get("variant", "") for r in records}) or [""]
    methods = [metrics.GENEVAL2_METRICS[m] for m in wanted if m in metrics.GENEVAL2_METRICS]
    out = []
    for variant in variants:
        mine = [r for r in records if r.get("variant", "") == variant]
        suffix = f"-{variant}" if len(variants) > 1 else ""
        for n, seed in enumerate(sorted({r.get("seed", 0) for r in mine}) or [None]):
            done, values = cache.setdefault(f"{variant}|{seed}", {}), {}
            rows = [r for r in mine if r.get("seed", 0) == seed]
            geneval2_replicate(run, rows, wanted, done, scorers.get("geneval2"))
            for metric in wanted:
                if metric not in done and metric not in metrics.GENEVAL2_METRICS:
                    result = replicate_metrics(run, metric, rows, mine, n == 0, scorers, args, suffix)
                    if result:
                        done[metric] = result
                values.update(done.get(metric, {}))
            lists = {m: done["score_lists"][m] for m in done.get("score_lists", {}) if m in methods}
            out.append((variant, seed, values, lists))
    if records or args.pie:
        files.write_json(cache_path, cache)
    return out


# -----------------------------------------------------------------------------
# Table, JSON, plot


def group_name(run, variant):
    name = re.sub(r"-seed\d+$", "", os.path.basename(os.path.normpath(run)))
    return f"{name}[{variant}]" if variant else name


def summarize(rows):
    """[(group, {column: value})] -> {group: {"n", "metrics": {column: {"mean", "std", "values"}}}};
    n counts the replicates, std is the sample std (ddof 1; 0 for a single value)."""
    groups = {}
    for group, values in rows:
        g = groups.setdefault(group, {"n": 0, "metrics": {}})
        g["n"] += 1
        for k, v in values.items():
            g["metrics"].setdefault(k, {"values": []})["values"].append(v)
    for g in groups.values():
        for m in g["metrics"].values():
            v = np.asarray(m["values"], np.float64)
            m["mean"], m["std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return groups


COLUMN_ORDER = (
    [f"shapes_{c}" for c in shapes.CATEGORIES + ["mean"]]
    + ["classifier"]
    + [f"geneval_{c}" for c in shapes.CATEGORIES + ["mean"]]
    + metrics.GENEVAL2_COLUMNS
    + [
        "imagereward",
        "pickscore",
        "clip",
        "hps",
        "fid",
        "lpips",
        "clip_edited",
        "clip_whole",
        "structure_distance",
        "bg_psnr",
        "bg_lpips",
        "bg_ssim",
    ]
)


def markdown_table(groups):
    columns = []
    for g in groups.values():
        columns += [c for c in g["metrics"] if c not in columns]
    columns.sort(key=lambda c: COLUMN_ORDER.index(c) if c in COLUMN_ORDER else len(COLUMN_ORDER))
    head = [c + (f" x{DISPLAY_SCALE[c]}" if c in DISPLAY_SCALE else "") for c in columns]
    lines = ["| run | n | " + " | ".join(head) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, g in groups.items():
        cells = []
        for c in columns:
            m, s = g["metrics"].get(c), DISPLAY_SCALE.get(c, 1)
            cell = "-" if m is None else f"{m['mean'] * s:.4g}"
            if m is not None and len(m["values"]) > 1:
                cell += f" ± {m['std'] * s:.2g}"
            cells.append(cell)
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curve(run, column):
    """(steps, values) of `column` in the run's training CSV (log.csv, else the first *.csv); rows
    where it is empty or missing are skipped."""
    paths = (
        [os.path.join(run, "log.csv")]
        if os.path.exists(os.path.join(run, "log.csv"))
        else sorted(glob.glob(os.path.join(run, "*.csv")))
    )
    steps, values = [], []
    if paths:
        with open(paths[0]) as f:
            for row in csv.DictReader(f):
                try:
                    step, value = float(row["step"]), float(row[column])
                except (KeyError, TypeError, ValueError):
                    continue
                steps.append(step)
                values.append(value)
    return steps, values


def plot(groups, runs, path, tradeoff=("fid", "imagereward"), curve="score_mean"):
    """Left: one metric against another, a point per row with +- bars (AGSM Fig. 5). Right: each run's
    validation curve from its training CSV (AGSM Fig. 4). Returns (points, curves) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x, y = tradeoff
    points = 0
    for name, g in groups.items():
        mx, my = g["metrics"].get(x), g["metrics"].get(y)
        if mx and my:
            left.errorbar(mx["mean"], my["mean"], xerr=mx["std"], yerr=my["std"], fmt="o", capsize=3, label=name)
            points += 1
    left.set(xlabel=x, ylabel=y, title=f"{y} vs {x}" if points else f"no run has both {x} and {y}")
    curves = 0
    for run in runs:
        steps, values = read_curve(run, curve)
        if values:
            right.plot(steps, values, marker=".", label=os.path.basename(os.path.normpath(run)))
            curves += 1
    right.set(xlabel="step", ylabel=curve, title=f"validation {curve}" if curves else f"no training CSV with {curve}")
    for ax, n in ((left, points), (right, curves)):
        if n:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return points, curves


# -----------------------------------------------------------------------------


def geneval2_record(args, scorer, score_lists):
    """eval.json's "geneval2": every atom's score beside the aggregates. Per replicate (run, variant, seed),
    each method's score lists as evaluation.py saves them in score_lists.json (so soft_tifa_analysis.py
    --score_data reads replicate["soft_tifa"] unchanged), the benchmark's prompts in the lists' order, and
    what the numbers depend on: the VQA model's folder name and dtype, transformers and torch, the commit."""
    items = scorer[0] if scorer else metrics.read_geneval2(args.geneval2)
    return dict(
        benchmark=args.geneval2,
        **metrics.geneval2_versions(args.vqa_model, scorer[1] if scorer else None),
        **provenance(),
        prompts=[item["prompt"] for item in items],
        replicates=score_lists,
    )


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_backbone_flags(p)  # the backbone of the classifier metric and of --protocol
    p.add_argument("--runs", nargs="+", default=[], help="run folders (records.jsonl + images, or edit.py output)")
    p.add_argument("--metrics", nargs="+", default=["shapes", "geneval"], choices=ALL_METRICS)
    p.add_argument("--ref", default=None, help="reference images for FID and LPIPS (e.g. COCO val 5K)")
    p.add_argument("--bench", "--pie", dest="pie", help="editing benchmark: PIE-Bench, DIV2K or Cat2Dog folder")
    p.add_argument(
        "--classifier-n",
        type=flags.NON_NEGATIVE_INT,
        default=20,
        help="classifier: eval prompts per category (0: all)",
    )
    p.add_argument(
        "--candidates", type=flags.integer_in(2), default=4, help="classifier: captions per image (1 true), at least 2"
    )
    p.add_argument("--weights", default=None, help="local folder of metric weights (then no hub access)")
    p.add_argument("--recompute", action="store_true", help="ignore the runs' eval_metrics.json caches")
    p.add_argument("--json", default=None, help="results file (default: eval.json beside the first run)")
    p.add_argument("--plot", nargs="?", const="", default=None, help="PNG path (default: eval.png beside the runs)")
    p.add_argument("--tradeoff", nargs=2, default=["fid", "imagereward"], metavar=("X", "Y"))
    p.add_argument("--curve", default="score_mean", help="training-CSV column of the validation curves")
    p.add_argument("--to-geneval", metavar="RUN", help="write RUN's images in GenEval's layout, then exit")
    p.add_argument("--geneval-prompts", help="GenEval's prompts/evaluation_metadata.jsonl (for --to-geneval)")
    p.add_argument("--geneval2", metavar="FILE", help="soft-tifa, tifa, vqascore: GenEval 2's geneval2_data.jsonl")
    p.add_argument(
        "--vqa-model", metavar="DIR", help="soft-tifa, tifa, vqascore: local image-text-to-text model (Qwen3-VL-8B...)"
    )
    p.add_argument("--protocol", choices=["dev", "eval"], help="shapes world: sample and score a prompt set with CIs")
    p.add_argument("--tokens", nargs="*", default=[], help="--protocol: token files to score beside the base")
    p.add_argument("--ema", action="store_true", help="--protocol: sample AGSM files with their EMA tokens")
    p.add_argument(
        "--n-per-category",
        type=flags.NON_NEGATIVE_INT,
        default=0,
        help="--protocol: first N prompts per category (0: all)",
    )
    p.add_argument("--grid", default=None, help="--protocol: PNG of base | tokens, first prompt per category")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    for run in args.runs + ([args.to_geneval] if args.to_geneval else []):
        if not os.path.isdir(run):
            raise files.refuse("--runs", run, "a folder written by sample.py or edit.py (records.jsonl + images)")
    if not args.runs and not args.to_geneval:
        raise SystemExit("nothing to do: pass --runs FOLDER ... or --to-geneval RUN")
    if args.to_geneval and not (args.geneval_prompts and os.path.exists(args.geneval_prompts)):
        raise SystemExit("--to-geneval needs --geneval-prompts, GenEval's prompts/evaluation_metadata.jsonl")
    if ({"fid", "lpips"} & set(args.metrics)) and not (args.ref and os.path.isdir(args.ref)):
        raise SystemExit("fid / lpips need --ref DIR, a folder of reference images")
    if "edit" in args.metrics and not (args.pie and benchmarks.kind(args.pie)):
        raise SystemExit("edit needs --bench DIR: PIE-Bench, DIV2K with captions or Cat2Dog (benchmarks.py)")
    if args.weights is not None and not os.path.isdir(args.weights):
        raise SystemExit(f"--weights {args.weights} is not a folder")


def export_geneval(run, prompts_file):
    with open(prompts_file) as f:
        metadata = [json.loads(line) for line in f if line.strip()]
    records = read_records(run)
    variants = sorted({r.get("variant", "") for r in records})
    for variant in variants:
        by_prompt = {}
        for r in records:
            if r.get("variant", "") == variant:
                by_prompt.setdefault(r["prompt"], []).append(os.path.join(run, r["image"]))
        suffix = f"-{variant}" if len(variants) > 1 else ""
        out = os.path.join(run, f"geneval{suffix}")
        write_geneval(by_prompt, metadata, out)
        print(
            f"wrote {out}; score it with GenEval's `python evaluation/evaluate_images.py {out} "
            f"--outfile {os.path.join(run, f'geneval_results{suffix}.jsonl')}`, then run eval.py again"
        )


# -----------------------------------------------------------------------------
# The shapes world's protocol (checker.protocol_seeds / protocol_scores)


def protocol_images(bb, records, which, handle=None, batch=128, steps=None):
    """Every record sampled with its SAMPLES_PER_PROMPT seeds, in protocol order (prompt-major)."""
    pairs = checker.protocol_seeds(len(records), which=which)
    images = []
    for i in tqdm(range(0, len(pairs), batch), desc=f"sample {which}", leave=False):
        part = pairs[i : i + batch]
        images.append(
            sampler.generate(
                bb, [records[p]["prompt"] for p, _ in part], [s for _, s in part], steps=steps, handle=handle
            )
        )
    return torch.cat(images)


def protocol_table(results):
    """Markdown: one row per variant, each column 'value [low, high]'."""
    columns = list(next(iter(results.values())))
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{scores[c][0]:.3f} [{scores[c][1]:.3f}, {scores[c][2]:.3f}]" for c in columns)
            + " |"
        )
    return "\n".join(lines)


def run_protocol(args):
    """--protocol: base and each --tokens file on the dev or eval prompts, 4 seeds each, with intervals."""
    bb = models.from_flags(args, shapes_world=backbones.load)
    records = classifier_records(args.n_per_category, args.protocol)
    specs = [r["spec"] for r in records]
    variants = [("base", None)] + [(f"tokens {path}", path) for path in args.tokens]
    results, grids, per_prompt = {}, [], {}
    first = [next(i for i, r in enumerate(records) if r["spec"]["category"] == c) for c in shapes.CATEGORIES]
    for name, path in variants:
        with trained.attached(bb, trained.read(path, args.model, ema=args.ema)) as handle:
            images = protocol_images(bb, records, args.protocol, handle)
        groups = checker.protocol_groups(images, specs)
        results[name] = checker.ordered(checker.bootstrap_interval(groups))
        per_prompt[name] = {c: {k: [float(x) for x in v] for k, v in g.items()} for c, g in groups.items()}
        print(f"{name}: {checker.format_scores(results[name])}", flush=True)
        if path is None:
            base_groups = groups
        else:  # the same prompts and seeds as the base: the paired difference and its interval
            results[f"{name} - base"] = checker.paired_difference(groups, base_groups)
            print(f"{name} - base: {checker.format_scores(results[f'{name} - base'])}", flush=True)
        grids.append(torch.stack([images[checker.SAMPLES_PER_PROMPT * i + k] for i in first for k in range(2)]))
    print(protocol_table(results))
    out = args.json or f"protocol-{args.model}-{args.protocol}.json"
    files.write_json(
        out,
        {
            **provenance(),  # the commit that made these numbers, and whether its tree had changes
            "model": args.model,
            "set": args.protocol,
            "prompts": len(records),
            "samples_per_prompt": checker.SAMPLES_PER_PROMPT,
            "results": results,
            "per_prompt": per_prompt,
        },
        indent=None,
    )  # per-prompt values: pooling training seeds later
    if args.grid:  # rows: the first prompt of each category x 2 seeds; columns: base | each token file
        cells = torch.stack([g[j] for j in range(len(grids[0])) for g in grids])
        names = ["base"] + (["tokens"] if len(variants) == 2 else [f"tokens {v}" for v in range(1, len(variants))])
        verdicts = [  # each image under its variant's name and the checker's verdict on its prompt
            f"{names[v]}: {'pass' if checker.check(g[j], specs[first[j // 2]]) else 'fail'}"
            for j in range(len(grids[0]))
            for v, g in enumerate(grids)
        ]
        rows = [records[i]["prompt"] for i in first]
        sampler.save_grid(cells, args.grid, per_cell=len(grids), columns=2, row_labels=rows, image_labels=verdicts)
        print(f"wrote {args.grid}")
    print(f"wrote {out}")
    return results


def main(argv=None):
    args = parse_args(argv)
    models.check_backbone_flags(args)
    for flag in ("json", "grid", "plot"):  # the outputs' places, before the work rather than after it
        path = getattr(args, flag, None)
        if path:
            files.check_writable(os.path.dirname(os.path.abspath(path)), f"--{flag} {path}: its folder")
    if args.protocol:
        for path in args.tokens:  # every file's kind, before the base is sampled
            files.check_trained(path)
        return run_protocol(args)
    check_args(args)
    if args.to_geneval:
        return export_geneval(args.to_geneval, args.geneval_prompts)
    scorers = metrics.load_scorers(args.metrics, args.weights, args.device)
    if "classifier" in args.metrics:
        scorers["classifier"] = models.from_flags(args, shapes_world=backbones.load)
    geneval2 = [m for m in args.metrics if m in metrics.GENEVAL2_METRICS]
    if geneval2:  # one model for the three methods
        scorers["geneval2"] = metrics.load_geneval2(args.geneval2, args.vqa_model, args.device, ", ".join(geneval2))
    rows, score_lists = [], []
    for run in args.runs:
        for variant, seed, values, lists in replicates(run, args.metrics, scorers, args):
            rows.append((group_name(run, variant), values))
            if lists:
                score_lists.append(dict(run=run, variant=variant, seed=seed, **lists))
    if not any(values for _, values in rows):  # no run gave a single number
        raise SystemExit(nothing_scored(args))
    groups = summarize(rows)
    print(markdown_table(groups))
    beside = os.path.dirname(os.path.abspath(os.path.normpath(args.runs[0])))
    json_path = args.json or os.path.join(beside, "eval.json")
    out = {"runs": args.runs, "groups": groups}
    if score_lists:
        out["geneval2"] = geneval2_record(args, scorers.get("geneval2"), score_lists)
    files.write_json(json_path, out)
    print(f"wrote {json_path}")
    if args.plot is not None:
        png = args.plot or os.path.join(beside, "eval.png")
        plot(groups, args.runs, png, tuple(args.tradeoff), args.curve)
        print(f"wrote {png}")
    return groups


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
