"""
gpu_jobs.py: the shapes-world measurements (issue #25) and the real-size memory checks (issue #23) as one
batch of independent commands for a machine with one GPU and many cores, run side by side in a pool; and
the speed measurements of real-size steps (issue #39), one job at a time.

    python -m shapes.gpu_jobs --deadline 480 --parallel 14 --pack $OUT     # what was run on the lent H200
    python -m shapes.gpu_jobs --set arms --deadline 420 --parallel 15 --pack $OUT   # #26's arms
    python -m shapes.gpu_jobs --set speed --out $OUT/speed                 # #39: one H100, under 8 minutes

Every job is a plain command of this repo (train.py, eval.py, bench.py); a training job is resumable
(--resume latest) and skipped once its tokens exist, so the same call run again continues where a
deadline stopped it. Run folders are under runs/gpu/; --pack writes them (without checkpoints' images)
as tar files of at most 15 MB into a folder, with one log per job.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import torch

import families
import files
import flags
import models
import run

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: train.py, runs/
RUNS = "runs/gpu"
BINDING = "two_object,position,color_attr"  # the kinds whose captions name two colours


DONE = {}  # run name -> the file its training writes last (tokens.safetensors, or lora.safetensors)


def train(name, model, loss, seed, steps=2000, extra=(), val_every=500):
    out = f"{RUNS}/{name}"
    DONE[name] = f"{out}/{'lora' if 'lora' in extra else 'tokens'}.safetensors"
    cmd = [
        PY,
        "train.py",
        "--model",
        model,
        "--loss",
        loss,
        "--seed",
        str(seed),
        "--steps",
        str(steps),
        "--threads",
        "1",
        "--precision",
        "fp32",
        "--out",
        out,
        "--resume",
        "latest",
        "--ckpt-every",
        "500",
        "--log-every",
        "500",
    ]
    cmd += ["--val-every", str(val_every), "--val-n", "8"] if val_every else []
    return dict(name=name, cmd=cmd + list(extra), done=DONE[name], needs=[])


def protocol(name, model, which, runs, n_per_category=0):
    out = f"{RUNS}/{name}.json"
    cmd = [
        PY,
        "eval.py",
        "--protocol",
        which,
        "--model",
        model,
        "--threads",
        "1",
        "--precision",
        "fp32",
        "--n-per-category",
        str(n_per_category),
        "--json",
        out,
        "--grid",
        f"{RUNS}/{name}.png",
        "--tokens",
    ] + [DONE[r] for r in runs]
    return dict(name=name, cmd=cmd, done=out, needs=list(runs))


def bench_job(name, model, size, batch, checkpointing):
    out = f"{RUNS}/{name}.txt"
    cmd = [PY, "-m", "shapes.bench", "--model", model, "--size", str(size), "--batch", str(batch), "--steps", "2"]
    cmd += ["--grad-checkpointing"] if checkpointing else []
    return dict(name=name, cmd=cmd, done=out, needs=[], stdout=out)


def jobs():
    """In the order they start (a job waits for the runs it `needs`)."""
    todo = []
    # 5. training length (AGSM Fig. 4): 10x the replication's steps, validated every 10%
    for loss in ("dsm", "softrepa", "agsm"):
        todo.append(train(f"length-tiny-sd3-{loss}", "tiny-sd3", loss, 0, steps=20000, val_every=2000))
    # 2. capacity control: dsm tokens on precise vs swapped captions of the binding kinds, one setting
    #    grown at a time from the defaults, then all of them at once (seed 0, dev set)
    settings = {
        "default": (2000, []),
        "steps20k": (20000, []),
        "lr1e-2": (2000, ["--lr", "1e-2"]),
        "tokens16": (2000, ["--n-tokens", "16"]),
        "layers4": (2000, ["--layers", "4"]),
        "notime": (2000, ["--time-table", "off"]),
        "all": (20000, ["--lr", "1e-2", "--n-tokens", "16", "--layers", "4"]),
    }
    capacity = []

    def capacity_run(setting, data):
        spec = ("shapes:" if data == "precise" else "shapes-swapped:") + BINDING
        steps, extra = settings[setting]
        capacity.append(f"capacity-{data}-{setting}")
        return train(capacity[-1], "tiny-sd3", "dsm", 0, steps=steps, extra=["--data", spec] + extra, val_every=steps)

    for setting in ("steps20k", "all"):  # the long ones first
        for data in ("precise", "swapped"):
            todo.append(capacity_run(setting, data))
    # 1. the replication: 3 methods x 3 training seeds x 2 backbones, 2,000 steps, paper defaults
    for model in ("tiny-sd3", "tiny-sd1.5"):
        for loss in ("dsm", "softrepa", "agsm"):
            for seed in (0, 1, 2):
                todo.append(train(f"rep-{model}-{loss}-seed{seed}", model, loss, seed))
    for setting in ("default", "lr1e-2", "tokens16", "layers4", "notime"):
        for data in ("precise", "swapped"):
            todo.append(capacity_run(setting, data))
    # 3. temperature tau = 1 and 4. token layers (SoftREPA app. D), tiny-sd3, 3 seeds
    for loss in ("softrepa", "agsm"):
        for seed in (0, 1, 2):
            todo.append(train(f"tau1-tiny-sd3-{loss}-seed{seed}", "tiny-sd3", loss, seed, extra=["--tau", "1"]))
    for layers in (1, 4):
        for seed in (0, 1, 2):
            todo.append(
                train(
                    f"layers{layers}-tiny-sd3-softrepa-seed{seed}",
                    "tiny-sd3",
                    "softrepa",
                    seed,
                    extra=["--layers", str(layers)],
                )
            )
    # the protocols (eval set for the replication and tau; dev set for layers and capacity), one call
    # per method so that they run side by side (each scores the same base: report.py merges them)
    for model in ("tiny-sd3", "tiny-sd1.5"):
        for loss in ("dsm", "softrepa", "agsm"):
            todo.append(
                protocol(f"eval-{model}-{loss}", model, "eval", [f"rep-{model}-{loss}-seed{s}" for s in range(3)])
            )
    for loss in ("softrepa", "agsm"):
        todo.append(
            protocol(f"eval-tau1-{loss}", "tiny-sd3", "eval", [f"tau1-tiny-sd3-{loss}-seed{s}" for s in range(3)])
        )
    for layers, prefix in ((1, "layers1-tiny-sd3"), (2, "rep-tiny-sd3"), (4, "layers4-tiny-sd3")):
        todo.append(
            protocol(f"dev-layers{layers}", "tiny-sd3", "dev", [f"{prefix}-softrepa-seed{s}" for s in range(3)])
        )
    for i in range(0, len(capacity), 4):
        todo.append(protocol(f"dev-capacity{i // 4}", "tiny-sd3", "dev", capacity[i : i + 4]))
    for loss in ("dsm", "softrepa", "agsm"):
        todo.append(protocol(f"dev-length-{loss}", "tiny-sd3", "dev", [f"length-tiny-sd3-{loss}"]))
    return todo


def arms_jobs():
    """#26, the papers' other arms on tiny-sd3 (dev set, 3 training seeds, 2,000 steps, paper defaults):
    LoRA + SoftREPA at the tokens' parameter count (rank 6 on the tokens' 2 blocks: 24,576 numbers against
    the tokens' 26,624) and at the paper's best LoRA (rank 4, same blocks: 16,384), LoRA + dsm (plain
    fine-tuning, the control), and SoftREPA with the counting loss at two weights."""
    arms = {
        "tokens-softrepa": ("softrepa", []),
        "lora6-softrepa": ("softrepa", ["--params", "lora", "--lora-rank", "6"]),
        "lora4-softrepa": ("softrepa", ["--params", "lora", "--lora-rank", "4"]),
        "lora6-dsm": ("dsm", ["--params", "lora", "--lora-rank", "6"]),
        "count0.1-softrepa": ("softrepa", ["--count-weight", "0.1"]),
        "count1-softrepa": ("softrepa", ["--count-weight", "1"]),
    }
    todo = [
        train(f"arms-{arm}-seed{seed}", "tiny-sd3", loss, seed, extra=extra)
        for arm, (loss, extra) in arms.items()
        for seed in (0, 1, 2)
    ]
    todo += [protocol(f"dev-arms-{arm}", "tiny-sd3", "dev", [f"arms-{arm}-seed{s}" for s in range(3)]) for arm in arms]
    return todo


def real_size_jobs():
    """#23: peak GPU memory of a training step at real size (random weights), with and without
    --grad-checkpointing, at sizes that fit one H200 side by side with the shapes jobs."""
    todo = []
    for model, size, batch in (("sd1.5", 512, 4), ("sdxl", 1024, 2), ("sd3", 512, 4), ("sd3", 1024, 2)):
        for ckpt in (True, False):
            todo.append(bench_job(f"bench-{model}-{size}-b{batch}{'-gc' if ckpt else ''}", model, size, batch, ckpt))
    return todo


def pack(folder, logs):
    """Run folders and logs as tar files of at most ~15 MB each (the device tool returns 8 files)."""
    paths = []
    for root, _, names in os.walk(RUNS):
        for n in names:
            if n.endswith(".png") and "/val" in root:
                continue
            paths.append(os.path.join(root, n))
    paths += [os.path.join(logs, n) for n in os.listdir(logs)]
    parts, size = [], 0
    for p in sorted(paths):
        if not parts or size > 12e6:
            parts.append([])
            size = 0
        parts[-1].append(p)
        size += os.path.getsize(p) * 0.5  # compressed, roughly

    def write_tar(tmp, members):
        with tarfile.open(tmp, "w:gz") as tar:
            for p in members:
                tar.add(p)

    # each part atomic (files.write): a full disk keeps the parts written before and no half archive
    return [
        files.write(os.path.join(folder, f"results{i}.tar.gz"), lambda tmp, m=members: write_tar(tmp, m))
        for i, members in enumerate(parts)
    ]


# -----------------------------------------------------------------------------
# --set speed (issue #39): what a real-size step costs on one GPU, each job alone on it, one after another:
# a plain command of shapes/bench.py in a child process each (speed_command), so that one job's memory, or
# crash, is not the next one's, and a job past its budget is stopped. Random weights of the
# real configs (families.py's `denoiser`), bf16, the denoiser alone: text features of the family's text
# length are fed directly, as the encoding cache feeds them (shapes/bench.py; the text encoders and the VAE
# are outside what is timed). Each job prints its own shapes/bench.py output to its log; the rows gather into
# one table, rewritten after every job (a deadline still leaves the table of the jobs done).
#   train    SoftREPA and AGSM training steps (step.train_step) at the papers' batch (4 images, 4 x 4
#            pairs), seconds per step (median of the timed rounds, the two losses taking turns), FLOPs from
#            torch's counter, MFU against the card's bf16 peak, peak memory; `rows`: --rows-per-forward
#            (0: the whole batch at once), halved when the step runs out of memory (the same step, docs/cost.md)
#   sample   the sampler, 28 steps at the family's CFG, with and without tokens: latency per image, the
#            overhead in percent (median of paired runs), peak memory (bench.bench_sampling)
#   ddp      a training step against the same step with the all-reduce that DDP adds, on a one-rank
#            process group: nccl on a GPU, gloo on the CPU (bench.bench_ddp)
# `budget`: the seconds a job may take on one H100 (its expected time, estimated in docs/cost.md, with room);
# the budgets sum to 7.25 minutes. On the CPU (or with --tiny) the same jobs run on the families' test-size
# denoisers (at the real text lengths), at 1/16 of the side, 2 x 2 pairs and 4 sampler steps: TINY, in
# seconds (tests/lab/test_gpu_jobs.py).
SPEED_JOBS = [
    dict(name="sd3-512", kind="train", model="sd3", size=512, rows=0, budget=50),
    dict(name="sd3-1024", kind="train", model="sd3", size=1024, rows=0, budget=75),
    # 4 x 4 pairs at 1024 px would hold ~101 GB of activations (docs/cost.md): two image rows per forward
    dict(name="sdxl-1024", kind="train", model="sdxl", size=1024, rows=2, budget=75),
    # FLUX.1-dev's recommended flag at 512 px (docs/cost.md): --rows-per-forward 1
    dict(name="flux-dev-512", kind="train", model="flux-dev", size=512, rows=1, budget=110),
    dict(name="sampler-sd3-1024", kind="sample", model="sd3", size=1024, rows=0, budget=75),
    dict(name="ddp-sd3-512", kind="ddp", model="sd3", size=512, rows=0, budget=50),
]
SPEED_DEADLINE = 450  # seconds for the whole set: under 8 minutes on one H100, with room to start
SAMPLER_STEPS = 28
TINY = dict(side=1 / 16, batch=2, sampler_steps=4)
SPEED_COLUMNS = ["job", "measure", "batch", "rows/fwd", "s", "TFLOP", "MFU", "peak GiB", "note"]


def papers_batch(job, tiny):
    """Images per step: the papers' (SoftREPA's and AGSM's are the same for these families), or TINY's."""
    batch = families.FAMILIES[job["model"]]["softrepa"]["batch"]
    assert batch == families.FAMILIES[job["model"]]["agsm"]["batch"], "one batch for both losses, to take turns"
    return TINY["batch"] if tiny else batch


def speed_command(job, args, result):
    """The job as a plain command of shapes/bench.py, its result written to the JSON file `result`."""
    size = round(job["size"] * TINY["side"]) if args.tiny else job["size"]
    batch = papers_batch(job, args.tiny)
    cmd = [PY, "-m", "shapes.bench", "--model", job["model"], "--size", str(size), "--device", args.device]
    cmd += ["--precision", args.precision, "--json", result] + (["--test-size"] if args.tiny else [])
    cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    if job["kind"] == "train":
        cmd += ["--configs", "softrepa", "agsm", "--batch", str(batch), "--steps", str(args.rounds)]
        cmd += ["--rows-per-forward", str(job["rows"])]
    elif job["kind"] == "sample":
        steps = TINY["sampler_steps"] if args.tiny else SAMPLER_STEPS
        cmd += ["--sampling", "--steps", str(steps), "--repeats", str(args.rounds)]
    else:
        cmd += ["--ddp", "--batch", str(batch), "--steps", str(args.rounds)]
    return cmd


def speed_rows(job, r):
    """The table's rows of one job's result (shapes/bench.py's JSON)."""
    if job["kind"] == "train":
        batch, median, flops = r["batch"], r["median"], r["flops"]
        ratio = (
            f"agsm / softrepa {median['agsm'] / median['softrepa']:.2f} s, "
            f"{flops['agsm'] / flops['softrepa']:.2f} FLOP (theory ~1.5)"
        )
        return [
            dict(
                measure=loss,
                batch=f"{batch} ({batch * batch} pairs)",
                rows_per_forward=r["rows_per_forward"],
                seconds=median[loss],
                tflop=flops[loss] / 1e12,
                mfu=r["mfu"].get(loss),
                peak_gib=r["peak_mem"].get(loss),
                note=ratio if loss == "agsm" else "",
            )
            for loss in ("softrepa", "agsm")
        ]
    if job["kind"] == "sample":
        common = dict(batch=f"{r['batch']} image", rows_per_forward=None, tflop=None, mfu=None)
        overhead = (
            f"latency {r['latency_overhead_pct']:+.1f}% (IQR/2 {r['latency_overhead_iqr_pct']:.1f}), "
            f"memory {r['peak_memory_overhead_pct']:+.2f}%"
        )
        return [
            dict(
                common,
                measure=f"sampler, {r['steps']} steps, cfg {r['cfg']:g}",
                seconds=r["latency_plain_s"],
                peak_gib=r["peak_memory_plain_mb"] / 1024,
                note="",
            ),
            dict(
                common,
                measure="sampler with tokens",
                seconds=r["latency_tokens_s"],
                peak_gib=r["peak_memory_tokens_mb"] / 1024,
                note=overhead,
            ),
        ]
    plain, ddp = r["median"]["plain"], r["median"][f"ddp {r['backend']}"]
    common = dict(batch=f"{r['batch']} ({r['batch'] ** 2} pairs)", rows_per_forward=None, tflop=None, mfu=None)
    return [
        dict(common, measure="softrepa step", seconds=plain, peak_gib=None, note=""),
        dict(
            common,
            measure=f"softrepa step, 1-rank {r['backend']} DDP",
            seconds=ddp,
            peak_gib=None,
            note=f"ddp / plain {ddp / plain:.3f}; all-reduce of {r['all_reduce_bytes'] / 1e6:.2f} MB",
        ),
    ]


def speed_table(rows):
    """The markdown table of the rows (None: "-")."""

    def cell(row, column):
        value = {
            "job": row.get("job"),
            "measure": row.get("measure"),
            "batch": row.get("batch"),
            "rows/fwd": row.get("rows_per_forward"),
            "s": None if row.get("seconds") is None else f"{row['seconds']:.4g}",
            "TFLOP": None if row.get("tflop") is None else f"{row['tflop']:.4g}",
            "MFU": None if row.get("mfu") is None else f"{row['mfu']:.1%}",
            "peak GiB": None if row.get("peak_gib") is None else f"{row['peak_gib']:.3g}",
            "note": row.get("note") or None,
        }[column]
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(SPEED_COLUMNS) + " |", "|---" * len(SPEED_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in SPEED_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def speed_title(args, results, where):
    """The line above the table: the command, the device and the peak MFU divides by, torch, the commit."""
    first = next(iter(results.values()), {})
    device, peak = first.get("device_name", "a device that ran no job"), first.get("peak_flops")
    source = "--peak-tflops" if first.get("peak_from_flag") else "read from its name"
    peak = f"peak {peak / 1e12:.0f} TFLOP/s bf16, {source}" if peak else "no known peak: no MFU (pass --peak-tflops)"
    dirty = " (dirty tree)" if where["dirty"] else ""
    return (
        f"`python -m shapes.gpu_jobs --set speed{' --tiny' if args.tiny else ''}` on {device} ({peak}), "
        f"{args.precision}, torch {torch.__version__}, commit {where['commit'][:12]}{dirty}"
    )


def run_child(cmd, log, budget):
    """Run `cmd` from the repo root, its output to `log`; its exit status, or None if stopped after `budget` s."""
    with open(log, "w") as f:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def speed_job(job, args, out, budget):
    """One job, alone: its rows (each naming the job), or one row saying what stopped it; and its result."""
    name = job["name"] + (f" (tiny: {round(job['size'] * TINY['side'])} px)" if args.tiny else "")
    result, log = os.path.join(out, "logs", f"{job['name']}.json"), os.path.join(out, "logs", f"{job['name']}.log")
    if os.path.exists(result):
        os.remove(result)  # a previous call's
    rc = run_child(speed_command(job, args, result), log, budget)
    if rc is None:
        return [dict(job=name, note=f"stopped at its budget of {budget:.0f} s (log: {log})")], None
    if rc != 0 or not os.path.exists(result):
        with open(log) as f:
            last = ([line.strip() for line in f if line.strip()] or ["(no output)"])[-1]
        return [dict(job=name, note=f"failed, exit {rc}: {last[:200]} (log: {log})")], None
    with open(result) as f:
        r = json.load(f)
    return [dict(row, job=name) for row in speed_rows(job, r)], r


def run_speed(args):
    """Every job of SPEED_JOBS (or --only), one after another, each alone in its child process with its
    budget; one table printed and written to --out (speed.md; speed.json: the rows and each job's result)."""
    out = os.path.abspath(args.out or os.path.join(ROOT, RUNS, "speed"))
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    where = run.provenance()
    deadline, start, rows, results = args.deadline or SPEED_DEADLINE, time.time(), [], {}
    for job in [job for job in SPEED_JOBS if not args.only or job["name"] in args.only]:
        left, t0 = deadline - (time.time() - start), time.time()
        if left < 5:
            rows.append(dict(job=job["name"], note="not run: the deadline had passed"))
        else:
            mine, result = speed_job(job, args, out, min(job["budget"], left))
            rows += mine
            if result is not None:
                results[job["name"]] = result
            print(f"[{time.time() - start:5.0f}s] {job['name']}: {time.time() - t0:.0f}s", flush=True)
        title, table = speed_title(args, results, where), speed_table(rows)
        files.write_text(os.path.join(out, "speed.md"), f"{title}\n\n{table}\n")
        files.write_json(os.path.join(out, "speed.json"), dict(title=title, **where, rows=rows, results=results))
    print(f"\n{title}\n\n{table}\nwrote {out}/speed.md and speed.json")
    return rows


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--deadline",
        type=flags.POSITIVE_FLOAT,
        default=None,
        help=f"seconds; then every job is stopped (default 480; --set speed {SPEED_DEADLINE})",
    )
    p.add_argument("--parallel", type=flags.POSITIVE_INT, default=14, help="jobs at once")
    p.add_argument("--pack", default=None, help="folder for the packed results")
    p.add_argument("--real-size", action="store_true", help="also the real-size memory benches (one at a time)")
    p.add_argument(
        "--set",
        default="replication",
        choices=["replication", "arms", "speed"],
        help="replication: #25's runs; arms: #26's LoRA and counting-loss runs; speed: #39's real-size steps",
    )
    on_cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if on_cuda else "cpu", help="speed: where the jobs run")
    p.add_argument("--precision", default="bf16", choices=list(models.PRECISIONS), help="speed: default bf16")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="speed: the families' test-size denoisers at 1/16 of the side (always on the CPU)",
    )
    p.add_argument("--rounds", type=flags.POSITIVE_INT, default=5, help="speed: timed rounds (sampler: repeats)")
    p.add_argument(
        "--peak-tflops",
        type=flags.POSITIVE_FLOAT,
        default=None,
        help="speed: the card's bf16 peak for MFU (default: read from the device name)",
    )
    p.add_argument("--out", default=None, help=f"speed: folder of the table and the logs (default {RUNS}/speed)")
    p.add_argument("--only", nargs="+", choices=[j["name"] for j in SPEED_JOBS], help="speed: these jobs only")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.set == "speed":
        args.tiny = args.tiny or args.device == "cpu"
        return run_speed(args)
    os.chdir(ROOT)
    args.deadline = args.deadline or 480
    start = time.time()
    logs = f"{RUNS}/logs"
    os.makedirs(logs, exist_ok=True)
    queue = [j for j in (arms_jobs() if args.set == "arms" else jobs()) if not os.path.exists(j["done"])]
    benches = [j for j in real_size_jobs() if not os.path.exists(j["done"])] if args.real_size else []
    running, status = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")

    def launch(job):
        out = open(job.get("stdout") or f"{logs}/{job['name']}.log", "w")
        running[job["name"]] = (
            subprocess.Popen(job["cmd"], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True),
            job,
            time.time(),
        )

    while (queue or benches or running) and time.time() - start < args.deadline:
        for name, (proc, _job, t0) in list(running.items()):
            if proc.poll() is not None:
                status[name] = dict(rc=proc.returncode, wall_s=round(time.time() - t0, 1))
                print(
                    f"[{time.time() - start:6.0f}s] {name}: rc {proc.returncode} in {time.time() - t0:.0f}s",
                    flush=True,
                )
                del running[name]
        failed = {n for n, s in status.items() if s["rc"] != 0}
        for job in list(queue):
            if any(n in failed for n in job["needs"]):
                queue.remove(job)
                status[job["name"]] = dict(rc="skipped: a run it needs failed")
        if benches and not any(n.startswith("bench") for n in running):
            launch(benches.pop(0))
        for job in list(queue):
            if len(running) >= args.parallel:
                break
            if all(os.path.exists(DONE[n]) for n in job["needs"]):
                queue.remove(job)
                launch(job)
        time.sleep(1)
    for name, (proc, _job, t0) in running.items():  # the deadline: stop what runs (checkpoints stay)
        os.killpg(proc.pid, signal.SIGTERM)
        status[name] = dict(rc="stopped at the deadline", wall_s=round(time.time() - t0, 1))
    time.sleep(3)
    status["_left"] = [j["name"] for j in queue + benches]
    files.write_json(f"{logs}/status.json", status)  # atomic (files.write): never half a status
    print(json.dumps(status, indent=1))
    if args.pack:
        print(pack(args.pack, logs))


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
