"""
train.py: train soft tokens on a frozen text-to-image diffusion model, with SoftREPA's contrastive
loss, AGSM's alignment-guided score matching, or plain score matching on matched pairs (dsm).

    python train.py --model tiny-sd3 --loss agsm                                 # one process
    torchrun --nproc_per_node=2 train.py --model sd3 --loss agsm --data /data/coco   # 2 GPUs, nccl
    torchrun --nproc_per_node=2 train.py --model tiny-sd3 --loss agsm            # 2 CPU cores, gloo

The step itself -- batch, pair matrix, forward(s), loss, all-reduce, AdamW, EMA -- is step.train_step
(step.py, beside AGSM Alg. 1); this file is the loop around it, read top to bottom:
  flags -> DDP -> resume -> the recipe (the papers' defaults per family, models.FAMILIES) -> data ->
  backbone and tokens -> optimizer and the authors' schedule scaled to the run (lr_at_step) -> logging
  -> the loop (step, log, validate, checkpoint) -> the trained tokens.
AdamW on the tokens only (the backbone is frozen), lr 1e-3, wd 1e-4 (both papers' Table 5 / 11).
DDP inline as in nanoGPT: torchrun starts one process per device; all ranks start from the same tokens
(same seed, and a broadcast) and take the same optimizer steps (step.py), which is checked at every
checkpoint. Rank 0 alone writes files.
Resuming (--resume latest) continues the same run exactly: the data and the noise of a step are
functions of (seed, step, rank), and the checkpoint holds tokens, EMA, optimizer, scheduler and step.
Nothing is lost: checkpoints are written atomically, a diverged update is never saved (step 0 is saved
first), and a run that stopped on NaN continues from its last good checkpoint with a lower --lr.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checker
import classifier
import data
import hooks
import models
import sampler
import shapes
import softtokens
import step as training

# Settings that decide the training trajectory: a resumed run takes them from its checkpoint and
# refuses a command line that contradicts them (a run is only resumable as the same run).
TRAJECTORY = ["model", "loss", "data", "size", "batch", "seed", "lr", "wd", "min_lr", "lr_period", "grad_clip",
              "n_tokens", "layers", "blocks", "time_table", "init", "tau", "scale", "dweight", "gamma_pos",
              "gamma_neg", "bradley_terry", "plain_sum", "noise_per_row", "ema_decay", "gather_text", "world"]
# Settings a resumed run may change: they act on the steps still to come, not on the past (lr: e.g. to
# continue a diverged run more slowly). Each change is recorded in config.json under "changes".
CHANGEABLE_ON_RESUME = ["lr"]
DEV_PROMPTS = [r["prompt"] for r in shapes.load_dev_set()[::30][:8]]   # fixed prompts of the token movement
VAL_PROMPTS = ["a photo of three apples on a wooden table", "a red bus parked next to a blue car",
               "a cat sitting to the left of a dog", "two people riding bicycles down a city street"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_backbone_flags(p, precision="bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--loss", default=None, choices=["softrepa", "agsm", "dsm"], help="default agsm (on --resume: "
                   "the checkpoint's)")
    p.add_argument("--data", default=None, help="'shapes' (tiny-* default; 'shapes:CAT,..' or 'shapes-swapped:CAT,..' for the capacity control), a COCO folder, captions_*.json, "
                   ".jsonl, a folder of images + .txt, or an encoding cache (python data.py cache)")
    p.add_argument("--val-data", default=None, help="held-out pairs for classifier.classifier_accuracy (real models)")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<loss>)")
    # the recipe: None means the paper default for the model (models.FAMILIES)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per rank; the pair matrix is batch x batch")
    p.add_argument("--size", type=int, default=None, help="training image size")
    p.add_argument("--lr", type=float, default=None, help="1e-3 (both papers)")
    p.add_argument("--wd", type=float, default=None, help="1e-4 (both papers)")
    p.add_argument("--min-lr", type=float, default=None, help="1e-5 (the released SoftREPA code)")
    p.add_argument("--lr-period", type=int, default=None, help="steps per scheduler step (default: the "
                   "authors' period scaled to --steps, see lr_at_step)")
    p.add_argument("--grad-clip", type=float, default=None, help="max token-gradient norm (default 0: off)")
    p.add_argument("--n-tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="token layers (MM-DiT blocks with tokens)")
    p.add_argument("--blocks", default=None, help="UNet block groups with tokens, e.g. down,mid")
    p.add_argument("--time-table", default=None, choices=["on", "off"])
    p.add_argument("--init", default=None, choices=["normal", "uncond"])
    p.add_argument("--tau", type=float, default=None, help="temperature of the error softmax (softrepa 0.07, "
                   "agsm 0.1: the authors' codes)")
    p.add_argument("--paper-tau", action="store_const", const=True, default=None,
                   help="agsm: tau = 1/(C*H*W), the plain sum of AGSM Alg. 1 line 8")
    p.add_argument("--plain-sum", action="store_const", const=True, default=None,
                   help="agsm: one plain sum over all pairs (AGSM Alg. 1 line 12) instead of the code's two means")
    p.add_argument("--noise-per-row", action="store_const", const=True, default=None,
                   help="one t and eps per image row instead of one per step (the authors' codes)")
    p.add_argument("--scale", type=float, default=None, help="SoftREPA logit scale (4)")
    p.add_argument("--dweight", type=float, default=None, help="SoftREPA: weight of the DSM term")
    p.add_argument("--gamma-pos", type=float, default=None)
    p.add_argument("--gamma-neg", type=float, default=None)
    p.add_argument("--bradley-terry", action="store_const", const=True, default=None, help="AGSM Table 7")
    p.add_argument("--ema-decay", type=float, default=None, help="AGSM EMA tokens (default 1 - 10/steps: the "
                   "code's 0.9999 at 100k steps, its horizon a tenth of any run)")
    p.add_argument("--gather-text", action="store_const", const=True, default=None,
                   help="softrepa: all ranks' captions as negatives (pair matrix B x world*B)")
    # machinery
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the frozen backbone in backward")
    p.add_argument("--rows-per-forward", type=int, default=None, metavar="N", help="image rows of the pair matrix "
                   "per forward and backward (the authors' --nrows; default: all); the step is the same")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' (<out>/ckpt.pt if there is one)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: never)")
    p.add_argument("--val-n", type=int, default=8, help="tiny-*: eval prompts per shapes category")
    p.add_argument("--val-steps", type=int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--log-every", type=int, default=10, help="a stdout line every N steps (the CSV gets every step)")
    return p.parse_args(argv)


def resolve(args, facts):
    """Fill every unset recipe value with the model family's paper default (step.default_recipe)."""
    for key, value in training.default_recipe(args.model, args.loss, args.steps, args.paper_tau).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.paper_tau, args.plain_sum, args.noise_per_row = bool(args.paper_tau), bool(args.plain_sum), bool(args.noise_per_row)
    # The schedule rule for runs of any length: the authors step CosineAnnealingWarmRestarts(T_0=10) once
    # every `period` iterations, and their runs hold paper_steps / period such periods (SoftREPA 60, AGSM
    # 100). Keeping that number fixed, period = steps * paper_period / paper_steps, gives a run of any length
    # the same shape of schedule: 6 (SoftREPA) or 10 (AGSM) cosine cycles, constant within each period.
    paper_steps, paper_period = training.LOSSES[args.loss]["paper_run"]
    args.lr_period = args.lr_period or max(1, round(args.steps * paper_period / paper_steps))
    if args.data is None:
        raise SystemExit(f"--data is required for {args.model}: a COCO folder, a .jsonl, a folder or a cache")


def lr_at_step(step, period, min_lr_ratio, cycle=10):
    """The lr multiplier at `step`: CosineAnnealingWarmRestarts(T_0=cycle, eta_min) stepped once every
    `period` steps, as the authors' loops do: lr = min + (max - min) (1 + cos(pi e / cycle)) / 2 with
    e = (step // period) mod cycle, constant within each period."""
    e = (step // period) % cycle
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * e / cycle)) / 2


def validate(bb, handle, args, step):
    """Sample a fixed prompt grid with the current tokens (saved as an image); tiny-*: the shapes checker's
    scores of those samples; and classifier.classifier_accuracy on held-out pairs."""
    tiny = models.is_shapes_world(bb.name)
    if tiny:  # the first val_n prompts of every category of the DEV set (the eval set is for final numbers)
        records = shapes.first_per_category(shapes.load_dev_set(), args.val_n)
        prompts = [r["prompt"] for r in records]
    else:
        records = [{"image": path, "prompt": caps[0], "captions": caps}
                   for path, caps in data.read_records(args.val_data, "val")[:6 * args.val_n]] if args.val_data else []
        prompts = VAL_PROMPTS
    images = torch.cat([sampler.generate(bb, prompts[i:i + 16], range(i, i + len(prompts[i:i + 16])), args.val_steps,
                                        handle=handle)
                        for i in range(0, len(prompts), 16)])
    os.makedirs(os.path.join(args.out, "val"), exist_ok=True)
    sampler.save_grid(images, os.path.join(args.out, "val", f"step{step:07d}.png"),
                     columns=args.val_n if tiny else len(prompts), min_side=256)
    result = {}
    if tiny:
        result.update({f"score_{k}": v for k, v in checker.score(images, [r["spec"] for r in records]).items()})
    if records:
        # the held-out diffusion-classifier accuracy (SoftREPA eqs. 15-18)
        result["heldout_acc"] = classifier.classifier_accuracy(bb, records, n_candidates=4, seed=0, handle=handle)
        # (tiny-*: the records are dev-set prompts, rendered afresh: held out from the training stream)
    return result


def read_checkpoint(path):
    """A checkpoint of this script, loaded without running code; one-line errors for anything else."""
    import pickle
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL " in str(e):     # weights_only refused a class (e.g. posix.system): code would have run
            raise SystemExit(f"--resume {path}: refused, its pickle asks to build objects that are not tensors, "
                             f"and nothing in it was run; pass a ckpt.pt written by train.py") from None
        raise SystemExit(f"--resume {path}: not a readable checkpoint (UnpicklingError); pass a ckpt.pt written "
                         f"by train.py, or start a new run in another --out") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:   # truncated, random bytes, not a zip
        raise SystemExit(f"--resume {path}: not a readable checkpoint ({type(e).__name__}); pass a ckpt.pt "
                         f"written by train.py, or start a new run in another --out") from None
    if not isinstance(state, dict) or "config" not in state or "tokens" not in state:
        raise SystemExit(f"--resume {path}: not a checkpoint of train.py (no tokens / config)")
    return state


def check_flags(args):
    """Every one-line error that needs no model and no data, before anything heavy."""
    for flag in ("steps", "batch", "ckpt_every", "log_every", "val_n"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("lr", "val_every", "wd", "min_lr", "grad_clip", "ema_decay", "tau", "scale", "dweight",
                 "gamma_pos", "gamma_neg"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):   # nan / inf / negative
            raise SystemExit(f"--{flag.replace('_', '-')} must be a finite number, not negative (got {value})")
    if args.rows_per_forward is not None and args.rows_per_forward < 1:
        raise SystemExit(f"--rows-per-forward must be at least 1 (got {args.rows_per_forward})")
    if args.gather_text and args.loss and training.LOSSES[args.loss]["pairs"] == "diagonal":
        raise SystemExit("--gather-text adds negatives, and --loss dsm uses none: drop one of the two")


def resume_config(args):
    """--resume: the checkpoint (or None), its trajectory settings filled into the unset flags. A flag
    that contradicts the checkpoint is an error, except the few that only act on the steps to come
    (CHANGEABLE_ON_RESUME), which are recorded in args.changes."""
    ckpt_path, state, args.changes = os.path.join(args.out, "ckpt.pt"), None, []
    if args.resume:
        path = ckpt_path if args.resume == "latest" else args.resume
        if os.path.exists(path):
            state = read_checkpoint(path)
            saved = json.loads(state["config"])
            args.changes = saved.get("changes", [])
            for key in TRAJECTORY:
                if getattr(args, key) is None:
                    setattr(args, key, saved[key])
                elif getattr(args, key) != saved[key] and key in CHANGEABLE_ON_RESUME:
                    args.changes.append({"step": state["step"], key: getattr(args, key), "was": saved[key]})
                elif getattr(args, key) != saved[key]:
                    raise SystemExit(f"--resume {path}: that run has {key}={saved[key]!r}, this one {getattr(args, key)!r}"
                                     f": pass the same value, or start a new run in another --out")
        elif args.resume != "latest":
            raise SystemExit(f"--resume {path}: no such checkpoint")
    return state


def open_log(args, columns, step, master):
    """log.csv (rank 0), appended from `step` on. A resumed run forgets the rows logged after its
    checkpoint: the kept rows go to a new file renamed over the old one, so a kill at any moment leaves
    the old log or the new one, whole. Returns a function that writes one row (and to TensorBoard)."""
    if not master:
        return lambda row: None
    csv_path, board = os.path.join(args.out, "log.csv"), None
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    kept = []
    if step and os.path.exists(csv_path):
        with open(csv_path) as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with open(csv_path + ".tmp", "w", newline="") as f:
        rewrite = csv.DictWriter(f, columns, extrasaction="ignore")
        rewrite.writeheader()
        rewrite.writerows(kept)
    os.replace(csv_path + ".tmp", csv_path)
    log = open(csv_path, "a", newline="")              # appended from here on, never truncated
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


def main(argv=None):
    args = parse_args(argv)
    models.check_flags(args)               # one-line errors before anything heavy
    facts = models.FAMILIES[args.model]
    check_flags(args)

    # ---- DDP (nanoGPT): torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; nccl on CUDA, gloo on CPU
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    use_cuda = args.device.startswith("cuda")
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    args.world = world
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.loss or 'agsm'}")
    if master:
        data.check_writable(args.out)              # a read-only --out fails now, not at the first checkpoint
        data.lock_folder(args.out)                 # one run per folder: a second one is refused
        for name in os.listdir(args.out):          # what a killed write left behind
            if name.endswith(".tmp"):
                os.remove(os.path.join(args.out, name))

    # ---- the recipe: the checkpoint's settings on --resume, then the paper defaults of the family
    state = resume_config(args)
    args.loss = args.loss or "agsm"
    resolve(args, facts)
    sampler.check_size(args.model, args.size)      # the family's sides (every script's rule)
    if training.LOSSES[args.loss]["pairs"] == "matrix" and args.batch * (world if args.gather_text else 1) < 2:
        raise SystemExit(f"--loss {args.loss} contrasts each image with the other captions of its batch: with "
                         f"--batch 1 there are none (the loss is 0). Pass --batch 2 or more, or --loss dsm")
    precision = args.precision or ("bf16" if use_cuda else "fp32")
    source = data.open_source(args.data, args.size, args.seed, workers=args.workers)  # a wrong path fails here
    if source["kind"] == "cache" and source["meta"]["model"] != args.model:
        raise SystemExit(f"{args.data} holds {source['meta']['model']} encodings, not {args.model}'s")
    if models.is_shapes_world(args.model) and source["kind"] == "files":   # the tiny text encoder's words
        data.check_vocabulary(source["records"], args.data)

    # ---- the frozen backbone and the soft tokens (same seed on every rank -> same initial tokens)
    bb = models.from_flags(args, "bf16", device, args.seed)
    sampler.check_size(args.model, args.size, bb=bb)   # and the sides the loaded model's positions reach
    if args.grad_checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
    tokens = softtokens.make_tokens(bb, args.loss, args.n_tokens, args.layers, args.time_table == "on",
                                    args.init, seed=args.seed).to(device)
    initial_tokens = {k: v.detach().clone().cpu() for k, v in tokens.state_dict().items()}  # for `movement`
    if ddp:
        for t in tokens.parameters():
            dist.broadcast(t.data, 0)
    blocks = tuple(b for b in args.blocks.split(",") if b)
    handle = hooks.attach(bb.denoiser, tokens.sets, blocks=blocks or None)
    if args.compile:
        bb.denoiser.compile()  # in place: the module (and the hooks on it) stay the same objects
    opt = torch.optim.AdamW(tokens.trainable(), lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at_step(step, args.lr_period, args.min_lr / args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 token gradients underflow

    # ---- resume: every state the next step depends on
    step, skipped, last_saved, ckpt_path = 0, 0, None, os.path.join(args.out, "ckpt.pt")
    if state is not None:
        tokens.load_state_dict(state["tokens"])
        initial_tokens = state["initial_tokens"]
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sched.base_lrs = [args.lr for _ in opt.param_groups]       # a changed --lr acts from here on
        for group in opt.param_groups:
            group["lr"] = args.lr * sched.lr_lambdas[0](state["step"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if use_cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        step, skipped = state["step"], state["skipped"]
        last_saved = step
        if source["kind"] == "files":
            source["bad"] = set(state["bad_images"].tolist())
        if master:
            print(f"resumed {ckpt_path if args.resume == 'latest' else args.resume} at step {step}")

    def checkpoint():
        """All ranks: check the tokens agree, pool the unreadable-image lists; rank 0: write atomically."""
        nonlocal last_saved
        flat = torch.cat([t.detach().flatten() for t in tokens.parameters()])
        bad = sorted(source.get("bad", ()))
        if ddp:
            reference = flat.clone()
            dist.broadcast(reference, 0)
            differ = (reference != flat).any().float()
            dist.all_reduce(differ, op=dist.ReduceOp.MAX)
            if differ.item():
                raise SystemExit(f"step {step}: the tokens differ between ranks (they must be identical)")
            everyone = [None] * world
            dist.all_gather_object(everyone, bad)
            bad = sorted(set().union(*everyone))
        if master:
            blob = dict(tokens=tokens.state_dict(), initial_tokens=initial_tokens, optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), scaler=scaler.state_dict(), step=step, skipped=skipped,
                        rng_cpu=torch.get_rng_state(), bad_images=torch.tensor(bad, dtype=torch.long),
                        config=json.dumps(vars(args)))
            if use_cuda:
                blob["rng_cuda"] = torch.cuda.get_rng_state(device)
            torch.save(blob, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash mid-write keeps the previous one
        last_saved = step

    def stop_diverged(what):
        """Stop every rank; the last checkpoint written is the last good state, to resume with a lower --lr."""
        if master:
            saved = f"{ckpt_path} (step {last_saved})" if last_saved is not None else "none"
            print(f"\n{what} Last good checkpoint: {saved}. Continue from it more slowly with "
                  f"--resume latest --lr <lower> (or try --precision fp32)")
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(1)

    if state is None:
        checkpoint()   # step 0: a good state to return to even if the very first update diverges

    # ---- logging (rank 0): CSV every step, a stdout line every log_every steps, TensorBoard if installed
    tiny = models.is_shapes_world(args.model)
    columns = ["step"] + training.STATS[:-1] + ["lr", "steps_per_s", "pairs_per_s", "peak_mem_gb", "skipped"]
    if args.val_every:
        columns += ["token_cos", "token_change", "output_change"]
        columns += [f"score_{c}" for c in shapes.CATEGORIES + ["mean"]] if tiny else []
        columns += ["heldout_acc"] if tiny or args.val_data else []
    record = open_log(args, columns, step, master)
    if args.val_every and step == 0 and master:  # the untrained tokens: the first point of the curve
        record({"step": 0, **validate(bb, handle, args, 0), **softtokens.movement(bb, tokens, initial_tokens, handle, DEV_PROMPTS)})
    B, with_negatives = args.batch, training.LOSSES[args.loss]["pairs"] == "matrix"
    pairs = B * B * (world if args.gather_text else 1) if with_negatives else B
    if master:
        print(f"{args.model} {args.loss}: {world} rank(s) on {device.type} ({precision}), {B} images x "
              f"{pairs // B} texts per rank per step, {sum(p.numel() for p in tokens.trainable()):,} trainable numbers")

    # ---- the loop
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.model} {args.loss}", disable=not master, file=sys.stdout)
    while step < args.steps:
        t0 = time.time()
        batch = data.get_batch(source, step, rank, world, B)    # a function of (seed, step, rank): data.py
        stats = training.train_step(bb, tokens, handle, opt, sched, scaler, args, batch, step, rank, world)
        if stats.get("diverged"):
            stop_diverged(f"loss is {stats['loss']} at step {step}: stopping, tokens not updated.")
        step += 1
        skipped += int(stats["new_bad"])
        # for agsm the in-batch accuracy is that of the training forward (psi+ on the diagonal, psi- off
        # it); the held-out accuracy (validation) ranks captions with psi+ alone. dsm runs no mismatched
        # pairs, so it logs none of their numbers (and no AGSM diagnostics): empty, not zero.
        dt = time.time() - t0
        row = dict(step=step, steps_per_s=1 / dt, pairs_per_s=pairs * world / dt, peak_mem_gb=training.peak_memory_gb(device),
                   skipped=skipped, **{k: stats[k] for k in ("loss", "err_matched", "lr")})
        if with_negatives:
            row.update(err_mismatched=stats["err_mismatched"], acc=stats["acc"])
        if training.LOSSES[args.loss]["ema_sets"] is not None:
            row.update(win_rate=stats["win_rate"], score_margin=stats["score_margin"])
        if args.val_every and (step % args.val_every == 0 or step == args.steps) and master:
            row.update(validate(bb, handle, args, step))
            row.update(softtokens.movement(bb, tokens, initial_tokens, handle, DEV_PROMPTS))
            tqdm.write(f"step {step} validation: " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith(("score_mean", "heldout"))))
        record(row)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.2f}" if with_negatives else "", skipped=skipped)
        if master and (step % args.log_every == 0 or step == args.steps):
            tqdm.write(f"step {step}: loss {stats['loss']:.4f} err+ {stats['err_matched']:.4f}"
                       + (f" err- {stats['err_mismatched']:.4f} acc {stats['acc']:.2f}" if with_negatives else "")
                       + f" lr {stats['lr']:.2e} {1 / dt:.2f} steps/s {pairs * world / dt:.1f} pairs/s "
                       f"peak {row['peak_mem_gb']:.2f} GB skipped {skipped}")
        if step % args.ckpt_every == 0 or step == args.steps:
            if not training.finite_after_update(bb, tokens, handle, args, stats["probe"], world):
                stop_diverged(f"the update of step {step} diverged (tokens or predictions not finite): not saved.")
            checkpoint()
    bar.close()

    # ---- the trained tokens, with what sample.py needs to attach them again
    tokens_path = os.path.join(args.out, "tokens.safetensors")
    if master:
        softtokens.save(tokens_path, tokens, model=args.model, loss=args.loss, arch=facts["arch"],
                        blocks=list(blocks), steps=step, batch=B, world=world, lr=args.lr, seed=args.seed,
                        gamma_pos=args.gamma_pos, gamma_neg=args.gamma_neg, dweight=args.dweight,
                        ema_decay=args.ema_decay, data=args.data)
        print(f"wrote {tokens_path} after {step} steps ({skipped} unreadable images skipped)")
    if ddp:
        dist.destroy_process_group()
    return dict(tokens=tokens, step=step, skipped=skipped, out=args.out, tokens_path=tokens_path, rank=rank)


if __name__ == "__main__":
    main()
