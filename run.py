"""
run.py: the run between steps -- what train.py keeps so that nothing is lost.

A run folder holds one run: the lock (lock_folder: a second run into the same folder is refused while the
first lives), its checkpoint ckpt.pt (written atomically: a kill mid-write keeps the previous one; loaded
with weights_only=True, so a file from elsewhere runs no code), config.json (the resolved flags and the
commit that ran them) and log.csv (appended, never rewritten in place). `--resume latest` continues the
very same run: the data and the noise of a step are functions of (seed, step, rank) alone (data.get_batch,
step.draw_noise), and the checkpoint holds everything else a step depends on.

train.py calls this file in a few lines: open_folder, resume_config and restore before the loop,
save_checkpoint and stop_diverged inside it, open_log for the log.
"""

import csv
import json
import os
import resource
import subprocess

import torch
import torch.distributed as dist

import files

# The run between steps: what train.py keeps so that nothing is lost. A run folder holds one run
# (lock_folder), its checkpoint ckpt.pt (written atomically: a kill mid-write keeps the previous one;
# loaded with weights_only=True, so a file from elsewhere runs no code), config.json and log.csv
# (appended, never rewritten in place); --resume latest continues the very same run.

# Settings that decide the training trajectory: a resumed run takes them from its checkpoint and
# refuses a command line that contradicts them (a run is only resumable as the same run).
TRAJECTORY = [
    "model",
    "loss",
    "data",
    "size",
    "batch",
    "seed",
    "lr",
    "wd",
    "min_lr",
    "lr_period",
    "grad_clip",
    "n_tokens",
    "layers",
    "blocks",
    "time_table",
    "init",
    "tau",
    "scale",
    "dweight",
    "gamma_pos",
    "gamma_neg",
    "bradley_terry",
    "plain_sum",
    "noise_per_row",
    "ema_decay",
    "gather_text",
    "world",
    "params",
    "lora_rank",
    "lora_blocks",
    "prompt_vectors",
    "prompt_init",
    "distill_prefix",
    "count_weight",
    "counter",
]
# Settings a resumed run may change: they act on the steps still to come, not on the past (lr: e.g. to
# continue a diverged run more slowly). Each change is recorded in config.json under "changes".
# (--rows-per-forward and --grad-checkpointing are free too: they change the memory, not the step.)
CHANGEABLE_ON_RESUME = ["lr"]


def save_checkpoint(path, blob):
    """Atomic: written beside, then renamed over the previous checkpoint (a crash or a full disk keeps the old
    one, and leaves no temporary file; files.write)."""
    files.write(path, lambda tmp: torch.save(blob, tmp))


def read_checkpoint(path):
    """A checkpoint of this script, loaded without running code (files.read_checkpoint: weights_only=True);
    one-line errors for anything else."""
    expected = "a ckpt.pt written by train.py (or start a new run in another --out)"
    state = files.read_checkpoint(path, "--resume", expected)
    if not isinstance(state, dict) or "config" not in state or "tokens" not in state:
        raise SystemExit(f"--resume {path}: not a checkpoint of train.py (no tokens / config)")
    return state


# Resuming. A checkpoint is a plain dict of tensors and one JSON string (the run's flags), loaded with
# weights_only=True so that a file from elsewhere cannot run code. resume_config reads the flags back
# before anything else happens: the run's recipe is the checkpoint's, and a command line that says
# otherwise about the trajectory (say --batch 8 against a run of batch 4) is refused in one line,
# because "resume" would then silently mean "a different run with the same name".


def resume_config(args):
    """--resume: the checkpoint (or None), its trajectory settings filled into the unset flags. A flag
    that contradicts the checkpoint is an error, except the few that only act on the steps to come
    (CHANGEABLE_ON_RESUME), which are recorded in args.changes. The code's commit goes into args (and so
    into config.json); a run resumed by other code records the switch in args.changes too."""
    ckpt_path, state, args.changes = os.path.join(args.out, "ckpt.pt"), None, []
    code = provenance()
    args.commit, args.dirty = code["commit"], code["dirty"]
    if args.resume:
        path = ckpt_path if args.resume == "latest" else args.resume
        if os.path.exists(path):
            state = read_checkpoint(path)
            saved = json.loads(state["config"])
            args.changes = saved.get("changes", [])
            if saved.get("commit") != args.commit or saved.get("dirty") != args.dirty:
                was = f"{saved.get('commit', 'unrecorded')}{'+changes' if saved.get('dirty') else ''}"
                now = f"{args.commit}{'+changes' if args.dirty else ''}"
                args.changes.append({"step": state["step"], "commit": now, "was": was})
            for key in TRAJECTORY:
                if key not in saved:  # a setting newer than the run: its default (resolve)
                    continue
                if getattr(args, key) is None:
                    setattr(args, key, saved[key])
                elif getattr(args, key) != saved[key] and key in CHANGEABLE_ON_RESUME:
                    args.changes.append({"step": state["step"], key: getattr(args, key), "was": saved[key]})
                elif getattr(args, key) != saved[key]:
                    raise SystemExit(
                        f"--resume {path}: that run has {key}={saved[key]!r}, this one {getattr(args, key)!r}"
                        f": pass the same value, or start a new run in another --out"
                    )
        elif args.resume != "latest":
            raise SystemExit(f"--resume {path}: no such checkpoint")
    return state


# The log. log.csv holds one row per step (every logged number) and is appended to, never rewritten in
# place: a resumed run first drops the rows after its checkpoint (they belong to a future that was lost)
# by writing the kept rows to a new file and renaming it over the old one.


def open_log(args, columns, step, master):
    """log.csv (rank 0), appended from `step` on. A resumed run forgets the rows logged after its
    checkpoint: the kept rows go to a new file renamed over the old one, so a kill at any moment leaves
    the old log or the new one, whole. Returns a function that writes one row (and to TensorBoard)."""
    if not master:
        return lambda row: None
    csv_path, board = os.path.join(args.out, "log.csv"), None
    files.write_json(os.path.join(args.out, "config.json"), vars(args))
    kept = []
    if step and os.path.exists(csv_path):
        with open(csv_path) as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    files.write_csv(csv_path, columns, kept)
    log = open(csv_path, "a", newline="")  # appended from here on, never truncated
    writer = csv.DictWriter(log, columns, extrasaction="ignore")
    try:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(os.path.join(args.out, "tb"))
    except ImportError:
        pass

    def record(row):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        log.flush()
        for k, v in row.items() if board is not None else ():
            board.add_scalar(k, v, row["step"])

    return record


# One run per folder. Two runs writing one folder would interleave their checkpoints and logs, each
# looking fine on its own; the lock file holds the pid of the run that owns the folder, so a second one
# is refused while the first lives, and a lock left by a killed run (its pid gone) is simply taken over.


def lock_folder(folder, flag="--out"):
    """Hold `folder` for this process (folder/lock, holding our pid) until it exits: a second run into the
    same folder is refused while the first one lives, and a lock left by a killed run is taken over."""
    import atexit

    path = os.path.join(folder, "lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and process_alive(pid):
                raise SystemExit(
                    f"{flag} {folder} is in use by another run (pid {pid}): wait for it, stop it, or "
                    f"pass another {flag}"
                ) from None
            os.remove(path)  # stale: its run is gone (or it is ours)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)

    def release():
        try:
            if open(path).read().strip() == str(os.getpid()):
                os.remove(path)
        except OSError:
            pass

    atexit.register(release)
    return release


def process_alive(pid):
    """Whether process `pid` lives: signal 0 delivers nothing and only checks that the process exists
    (PermissionError: it exists, under another user). A lock whose holder is gone is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def peak_memory_gb(device):
    """The peak memory of this process so far, logged every step (peak_mem_gb): on CUDA the allocator's
    peak of live tensors, on the CPU the peak resident set size (everything, the Python process included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (peak RSS)


# -----------------------------------------------------------------------------
# Opening the folder, and where the code came from


def open_folder(folder, master):
    """The run folder, before anything heavy: writable (checked now, not at the first checkpoint), held by
    this run alone (lock_folder), and cleared of what a killed write left behind (*.tmp). Rank 0 only."""
    if not master:
        return
    files.check_writable(folder)
    lock_folder(folder)
    for name in os.listdir(folder):
        if name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def provenance():
    """{"commit": the git commit of this code, "dirty": whether its tree had changes} -- recorded in every
    run's config.json, so that results made by different code are never pooled unawares. Outside a git
    checkout (an installed copy): commit "unknown"."""
    root = os.path.dirname(os.path.abspath(__file__))

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return dict(commit="unknown", dirty=None)
    if commit.returncode != 0:
        return dict(commit="unknown", dirty=None)
    return dict(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()))


# -----------------------------------------------------------------------------
# Checkpoints: saving every state the next step depends on, and restoring it


def save_state(*, path, args, tokens, initial_tokens, opt, sched, scaler, step, skipped, bad_images, device, world):
    """All ranks: check that the trained numbers agree and pool the unreadable-image lists; rank 0 writes
    the checkpoint atomically. The tokens must be bit-identical across ranks (same start, same all-reduced
    gradient, same AdamW): a difference means a bug, and it is better to stop than to save either copy."""
    bad = sorted(bad_images)
    if world > 1:  # rank 0's tokens against everyone's, and the union of the unreadable images met
        flat = torch.cat([t.detach().flatten() for t in tokens.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        differ = (reference != flat).any().float()
        dist.all_reduce(differ, op=dist.ReduceOp.MAX)
        if differ.item():
            raise SystemExit(f"step {step}: the tokens differ between ranks (they must be identical)")
        everyone = [None] * world
        dist.all_gather_object(everyone, bad)
        bad = sorted(set().union(*everyone))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    blob = dict(
        tokens=tokens.state_dict(),
        initial_tokens=initial_tokens,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        scaler=scaler.state_dict(),
        step=step,
        skipped=skipped,
        rng_cpu=torch.get_rng_state(),
        bad_images=torch.tensor(bad, dtype=torch.long),
        config=json.dumps(vars(args)),
    )
    if device.type == "cuda":
        blob["rng_cuda"] = torch.cuda.get_rng_state(device)
    save_checkpoint(path, blob)


def restore(state, *, args, tokens, opt, sched, scaler, device):
    """Every state of checkpoint `state` back into the run's objects: the trained numbers, the optimizer, the
    schedule (at a changed --lr from here on), the gradient scaler and the RNGs. Returns (step, skipped,
    initial tokens, the unreadable images met so far)."""
    tokens.load_state_dict(state["tokens"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = [args.lr for _ in opt.param_groups]  # a changed --lr acts from here on
    for group in opt.param_groups:
        group["lr"] = args.lr * sched.lr_lambdas[0](state["step"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["step"], state["skipped"], state["initial_tokens"], set(state["bad_images"].tolist())


def stop_diverged(what, *, ckpt_path, last_saved, master):
    """Stop every rank on a non-finite loss or update; the last checkpoint written is the last good state,
    from which the run continues more slowly (--resume latest --lr <lower>)."""
    if master:
        saved = f"{ckpt_path} (step {last_saved})" if last_saved is not None else "none"
        print(
            f"\n{what} Last good checkpoint: {saved}. Continue from it more slowly with "
            f"--resume latest --lr <lower> (or try --precision fp32)"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(1)


def resume_or_start(state, saved, initial_tokens, source, master, world):
    """Before the loop. On --resume, every state of the checkpoint back into the run (restore), and the
    unreadable images it had met; otherwise step 0 is saved before any update, a good state to return to
    even if the very first update diverges. `saved`: save_state's arguments that stay fixed for the run.
    Returns (step, skipped, the tokens' starting values)."""
    if state is None:
        save_state(**saved, initial_tokens=initial_tokens, step=0, skipped=0, bad_images=(), world=world)
        return 0, 0, initial_tokens
    keep = {k: saved[k] for k in ("args", "tokens", "opt", "sched", "scaler", "device")}
    step, skipped, initial_tokens, bad = restore(state, **keep)
    if source["kind"] == "files":
        source["bad"] = bad
    if master:
        args = saved["args"]
        print(f"resumed {saved['path'] if args.resume == 'latest' else args.resume} at step {step}")
    return step, skipped, initial_tokens
