"""
gpu_jobs.py: the shapes-world measurements (issue #25) and the real-size memory checks (issue #23) as one
batch of independent commands for a machine with one GPU and many cores, run side by side in a pool.

    python -m shapes.gpu_jobs --deadline 480 --parallel 14 --pack $OUT     # what was run on the lent H200
    python -m shapes.gpu_jobs --set arms --deadline 420 --parallel 15 --pack $OUT   # #26's arms

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

import files
import flags

PY = sys.executable
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


def bench(name, model, size, batch, checkpointing):
    out = f"{RUNS}/{name}.txt"
    cmd = [PY, "bench.py", "--model", model, "--size", str(size), "--batch", str(batch), "--steps", "2"]
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
            todo.append(bench(f"bench-{model}-{size}-b{batch}{'-gc' if ckpt else ''}", model, size, batch, ckpt))
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


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deadline", type=flags.POSITIVE_FLOAT, default=480, help="seconds; then every job is stopped")
    p.add_argument("--parallel", type=flags.POSITIVE_INT, default=14, help="jobs at once")
    p.add_argument("--pack", default=None, help="folder for the packed results")
    p.add_argument("--real-size", action="store_true", help="also the real-size memory benches (one at a time)")
    p.add_argument(
        "--set",
        default="replication",
        choices=["replication", "arms"],
        help="replication: #25's runs; arms: #26's LoRA and counting-loss runs",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: train.py, runs/
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
