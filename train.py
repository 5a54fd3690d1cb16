"""
train.py: train soft tokens on a frozen text-to-image diffusion model, with SoftREPA's contrastive
loss, AGSM's alignment-guided score matching, or plain score matching on matched pairs (dsm).

    python train.py --model tiny-sd3 --loss agsm                                 # one process
    torchrun --nproc_per_node=2 train.py --model sd3 --loss agsm --data /data/coco   # 2 GPUs, nccl
    torchrun --nproc_per_node=2 train.py --model tiny-sd3 --loss agsm            # 2 CPU cores, gloo

One step (SoftREPA eq. 14 and Alg. 1; AGSM Alg. 1):
  - B images x0^i and their captions c^i (data.py). Every image meets every caption: the B x B pair
    matrix, matched pairs (i, i) on the diagonal. One noise level t and one noise eps for the whole
    step, as both authors' codes do (torch.randint(min_t, max_t, (1,)); AGSM Alg. 1 lines 4-5); with
    --noise-per-row each image row draws its own. Either way only the caption differs along a row.
    Pairs whose caption repeats the row's own are no negatives (losses.duplicates).
  - All B*B pairs go through the frozen denoiser in one batched forward with the soft tokens
    attached (hooks.py); losses.py turns the predictions into the loss:
      softrepa  cross-entropy over each row's denoising errors (SoftREPA eqs. 9-14) + dweight * DSM
      agsm      psi+ on the diagonal, psi- off it (AGSM eq. 17); the targets (eqs. 13-16) come from a
                no-grad forward with the EMA tokens; after the step the EMA update
      dsm       the positive-only baseline (AGSM Table 4 (i)): the diagonal alone, B pairs
  - AdamW on the tokens only (the backbone is frozen), lr 1e-3, wd 1e-4 (both papers' Table 5 / 11), and
    the authors' schedule scaled to the run's length (lr_at_step below).
DDP inline as in nanoGPT: torchrun starts one process per device; each rank draws its own images,
all start from the same tokens (same seed, and a broadcast), the token gradients are averaged with
one all-reduce, so every rank takes the same optimizer step and the tokens stay identical (checked at
every checkpoint). Rank 0 alone writes files.
Resuming (--resume latest) continues the same run exactly: the data and the noise of a step are
functions of (seed, step, rank), and the checkpoint holds tokens, EMA, optimizer, scheduler and step.
"""
import argparse
import csv
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import hooks
import losses
import models
import shapes
import softtokens

# Settings that decide the training trajectory: a resumed run takes them from its checkpoint and
# refuses a command line that contradicts them (a run is only resumable as the same run).
TRAJECTORY = ["model", "loss", "data", "size", "batch", "seed", "lr", "wd", "min_lr", "lr_period", "grad_clip",
              "n_tokens", "layers", "blocks", "time_table", "init", "tau", "scale", "dweight", "gamma_pos",
              "gamma_neg", "bradley_terry", "plain_sum", "noise_per_row", "ema_decay", "gather_text", "world"]
# Settings a resumed run may change: they act on the steps still to come, not on the past (lr: e.g. to
# continue a diverged run more slowly). Each change is recorded in config.json under "changes".
CHANGEABLE_ON_RESUME = ["lr"]
# The authors' runs, for the schedule rule: iterations, and iterations per step of their scheduler
# (SoftREPA: 30k iterations, the scheduler stepped every 500; AGSM: 100k, stepped every --num_iter, whose
# argparse default is 2500 but which scripts/train_coco.sh sets to 1000 for SD3 and SD1.5: what they ran).
PAPER_RUNS = {"softrepa": (30000, 500), "agsm": (100000, 1000), "dsm": (100000, 1000)}
VAL_PROMPTS = ["a photo of three apples on a wooden table", "a red bus parked next to a blue car",
               "a cat sitting to the left of a dog", "two people riding bicycles down a city street"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", help=f"one of {', '.join(models.FAMILIES)}")
    p.add_argument("--loss", default=None, choices=["softrepa", "agsm", "dsm"], help="default agsm (on --resume: "
                   "the checkpoint's)")
    p.add_argument("--data", default=None, help="'shapes' (tiny-* default), a COCO folder, captions_*.json, "
                   ".jsonl, a folder of images + .txt, or an encoding cache (python data.py cache)")
    p.add_argument("--val-data", default=None, help="held-out pairs for eval.classifier_accuracy (real models)")
    p.add_argument("--pretrained", default=None, help="local folder of the backbone (default: the hub / weights/)")
    p.add_argument("--random-init", action="store_true", help="tiny-* only: random-weight backbone (tests)")
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
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the frozen backbone in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' (<out>/ckpt.pt if there is one)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: never)")
    p.add_argument("--val-n", type=int, default=8, help="tiny-*: eval prompts per shapes category")
    p.add_argument("--val-steps", type=int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--log-every", type=int, default=10, help="a stdout line every N steps (the CSV gets every step)")
    return p.parse_args(argv)


def resolve(args, facts):
    """Fill every unset recipe value with the model family's paper default (models.FAMILIES)."""
    recipe = facts["agsm" if args.loss == "dsm" else args.loss]
    defaults = dict(data="shapes" if facts["hub"] is None else None, size=facts["size"], batch=recipe["batch"],
                    seed=0, lr=1e-3, wd=1e-4, min_lr=1e-5, grad_clip=0.0, n_tokens=facts["n_tokens"],
                    layers=facts["token_layers"], blocks=",".join(facts["token_blocks"] or ()),
                    time_table="on" if facts["time_table"] else "off", init=facts["init"], scale=4.0,
                    dweight=facts["softrepa"]["dweight"], gamma_pos=facts["agsm"]["gamma_pos"],
                    gamma_neg=facts["agsm"]["gamma_neg"], bradley_terry=False, gather_text=False)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps or recipe["steps"]
    args.tau = args.tau or (1.0 if args.paper_tau else 0.1 if args.loss == "agsm" else 0.07)
    args.paper_tau, args.plain_sum, args.noise_per_row = bool(args.paper_tau), bool(args.plain_sum), bool(args.noise_per_row)
    # The schedule rule for runs of any length: the authors step CosineAnnealingWarmRestarts(T_0=10) once
    # every `period` iterations, and their runs hold paper_steps / period such periods (SoftREPA 60, AGSM
    # 100). Keeping that number fixed, period = steps * paper_period / paper_steps, gives a run of any length
    # the same shape of schedule: 6 (SoftREPA) or 10 (AGSM) cosine cycles, constant within each period.
    paper_steps, paper_period = PAPER_RUNS[args.loss]
    args.lr_period = args.lr_period or max(1, round(args.steps * paper_period / paper_steps))
    # The EMA rule: the AGSM code's decay 0.9999 per step over 100k steps averages over the last
    # 1 / (1 - 0.9999) = 10^4 steps, a tenth of the run; 1 - 10 / steps keeps that fraction for any length.
    args.ema_decay = args.ema_decay or max(0.0, 1 - 10 / args.steps)
    if args.data is None:
        raise SystemExit(f"--data is required for {args.model}: a COCO folder, a .jsonl, a folder or a cache")


def lr_at_step(step, period, min_lr_ratio, cycle=10):
    """The lr multiplier at `step`: CosineAnnealingWarmRestarts(T_0=cycle, eta_min) stepped once every
    `period` steps, as the authors' loops do: lr = min + (max - min) (1 + cos(pi e / cycle)) / 2 with
    e = (step // period) mod cycle, constant within each period."""
    e = (step // period) % cycle
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * e / cycle)) / 2


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB -> GiB (peak RSS)


def validate(bb, handle, args, step):
    """Sample a fixed prompt grid with the current tokens (saved as an image); tiny-*: the shapes checker's
    scores of those samples; and eval.classifier_accuracy on held-out pairs when eval.py provides it."""
    import sample
    tiny = bb.facts["hub"] is None
    if tiny:  # the first val_n prompts of every category of the DEV set (the eval set is for final numbers)
        records = shapes.first_per_category(shapes.load_dev_set(), args.val_n)
        prompts = [r["prompt"] for r in records]
    else:
        records = [{"image": path, "prompt": caps[0], "captions": caps}
                   for path, caps in data.read_records(args.val_data, "val")[:6 * args.val_n]] if args.val_data else []
        prompts = VAL_PROMPTS
    images = torch.cat([sample.generate(bb, prompts[i:i + 16], range(i, i + len(prompts[i:i + 16])), args.val_steps,
                                        handle=handle)
                        for i in range(0, len(prompts), 16)])
    os.makedirs(os.path.join(args.out, "val"), exist_ok=True)
    sample.save_grid(images, os.path.join(args.out, "val", f"step{step:07d}.png"),
                     columns=args.val_n if tiny else len(prompts), min_side=256)
    result = {}
    if tiny:
        result.update({f"score_{k}": v for k, v in shapes.score(images, [r["spec"] for r in records]).items()})
    if records:
        import eval as evaluation  # held-out diffusion-classifier accuracy (SoftREPA eqs. 15-18)
        result["heldout_acc"] = evaluation.classifier_accuracy(bb, records, n_candidates=4, seed=0, handle=handle)
        # (tiny-*: the records are dev-set prompts, rendered afresh: held out from the training stream)
    return result


@torch.no_grad()
def movement(bb, tokens, initial_tokens, handle, n=8):
    """How far the tokens have moved (SoftREPA/AGSM do not report this; the std of the tokens cannot show
    it, as each MM-DiT block sees them through a LayerNorm without affine): the cosine of the tokens to
    their initial values, their relative L2 change, and the relative change of the denoiser's output
    that the (psi+) tokens cause, ||f_tokens - f_plain|| / ||f_plain||, on n fixed eval prompts at t = 0.5."""
    cos, change = softtokens.token_movement(tokens, initial_tokens)
    prompts = [r["prompt"] for r in shapes.load_dev_set()[::30][:n]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(prompts),) + models.latent_shape(bb), generator=g).to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, prompts)
    t = torch.full((len(prompts),), 500.0, device=bb.device)
    with handle.rows(torch.full((len(prompts),), -1, dtype=torch.long)):
        plain = models.denoise(bb, x, t, cond).float()
    with handle.rows(None):
        with_tokens = models.denoise(bb, x, t, cond).float()
    return dict(token_cos=cos, token_change=change,
                output_change=float((with_tokens - plain).norm() / plain.norm().clamp(min=1e-12)))


def gather_captions(cond, rank, world):
    """Every rank's caption features as more negatives, this rank's first: matched pairs stay on the diagonal."""
    if isinstance(cond, dict):
        return {k: gather_captions(v, rank, world) for k, v in cond.items()}
    parts = [torch.empty_like(cond) for _ in range(world)]
    dist.all_gather(parts, cond.contiguous())
    return torch.cat([parts[rank]] + parts[:rank] + parts[rank + 1:])


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


def main(argv=None):
    args = parse_args(argv)
    facts = models.check_name(args.model)  # one-line errors before anything heavy
    for flag in ("steps", "batch", "ckpt_every", "log_every", "val_n"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("lr", "val_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must not be negative (got {getattr(args, flag)})")
    if args.random_init and facts["hub"] is not None:
        raise SystemExit("--random-init builds a tiny shapes-world backbone: use it with tiny-sd3 or tiny-sd1.5")
    if args.gather_text and args.loss == "dsm":
        raise SystemExit("--gather-text adds negatives, and --loss dsm uses none: drop one of the two")
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- DDP (nanoGPT): torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; nccl on CUDA, gloo on CPU
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
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
        for name in os.listdir(args.out):          # what a killed write left behind
            if name.endswith(".tmp"):
                os.remove(os.path.join(args.out, name))

    # ---- resume: the checkpoint's trajectory settings win over unset flags; contradicting ones are an
    # error, except the few that only act on the steps to come (CHANGEABLE_ON_RESUME), which are recorded
    ckpt_path, state, changes = os.path.join(args.out, "ckpt.pt"), None, []
    if args.resume:
        path = ckpt_path if args.resume == "latest" else args.resume
        if os.path.exists(path):
            state = read_checkpoint(path)
            saved = json.loads(state["config"])
            changes = saved.get("changes", [])
            for key in TRAJECTORY:
                if getattr(args, key) is None:
                    setattr(args, key, saved[key])
                elif getattr(args, key) != saved[key] and key in CHANGEABLE_ON_RESUME:
                    changes.append({"step": state["step"], key: getattr(args, key), "was": saved[key]})
                elif getattr(args, key) != saved[key]:
                    raise SystemExit(f"--resume {path}: that run has {key}={saved[key]!r}, this one {getattr(args, key)!r}"
                                     f": pass the same value, or start a new run in another --out")
        elif args.resume != "latest":
            raise SystemExit(f"--resume {path}: no such checkpoint")
    args.loss = args.loss or "agsm"
    resolve(args, facts)
    args.changes = changes
    precision = args.precision or ("bf16" if use_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    source = data.open_source(args.data, args.size, args.seed, workers=args.workers)  # a wrong path fails here
    if source["kind"] == "cache" and source["meta"]["model"] != args.model:
        raise SystemExit(f"{args.data} holds {source['meta']['model']} encodings, not {args.model}'s")
    if facts["hub"] is None and source["kind"] == "files":   # the tiny text encoder's words, checked up front
        data.check_vocabulary(source["records"], args.data)

    # ---- the frozen backbone and the soft tokens (same seed on every rank -> same initial tokens)
    if args.random_init:
        bb = models.build_tiny(args.model, seed=args.seed)
        bb.to(device, dtype)
    else:
        bb = models.load(args.model, args.pretrained, device=device, dtype=dtype)
    if args.grad_checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
    tokens = softtokens.make_tokens(bb, args.loss, args.n_tokens, args.layers, args.time_table == "on",
                                    args.init, seed=args.seed).to(device)
    initial_tokens = {k: v.detach().clone().cpu() for k, v in tokens.state_dict().items()}  # for `movement`
    params = tokens.trainable() if args.loss == "agsm" else list(tokens.parameters())
    if ddp:
        for t in tokens.parameters():
            dist.broadcast(t.data, 0)
    blocks = tuple(b for b in args.blocks.split(",") if b)
    handle = hooks.attach(bb.denoiser, tokens.sets if args.loss == "agsm" else tokens, blocks=blocks or None)
    if args.compile:
        bb.denoiser.compile()  # in place: the module (and the hooks on it) stay the same objects
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at_step(step, args.lr_period, args.min_lr / args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 token gradients underflow
    autocast = torch.autocast(device.type, dtype=dtype) if precision != "fp32" else nullcontext()
    step, skipped, last_saved = 0, 0, None
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
                        scheduler=sched.state_dict(),
                        scaler=scaler.state_dict(), step=step, skipped=skipped, rng_cpu=torch.get_rng_state(),
                        bad_images=torch.tensor(bad, dtype=torch.long), config=json.dumps(vars(args)))
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
    tiny = facts["hub"] is None
    columns = ["step", "loss", "err_matched", "err_mismatched", "acc", "win_rate", "score_margin", "lr",
               "steps_per_s", "pairs_per_s", "peak_mem_gb", "skipped"]
    if args.val_every:
        columns += ["token_cos", "token_change", "output_change"]
        columns += [f"score_{c}" for c in shapes.CATEGORIES + ["mean"]] if tiny else []
        columns += ["heldout_acc"] if tiny or args.val_data else []
    csv_path, board, kept = os.path.join(args.out, "log.csv"), None, []
    if master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        if step and os.path.exists(csv_path):
            # resumed: forget the rows logged after the checkpoint. The kept rows go to a new file that is
            # renamed over the old one, so a kill at any moment leaves the old log or the new one, whole.
            with open(csv_path) as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with open(csv_path + ".tmp", "w", newline="") as f:
                rewrite = csv.DictWriter(f, columns, extrasaction="ignore")
                rewrite.writeheader()
                rewrite.writerows(kept)
            os.replace(csv_path + ".tmp", csv_path)
        else:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, columns).writeheader()
        log = open(csv_path, "a", newline="")              # appended from here on, never truncated
        writer = csv.DictWriter(log, columns, extrasaction="ignore")
        try:
            from torch.utils.tensorboard import SummaryWriter
            board = SummaryWriter(os.path.join(args.out, "tb"))
        except ImportError:
            pass

    def record(row):
        if master:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            log.flush()
            for k, v in row.items() if board is not None else ():
                board.add_scalar(k, v, row["step"])

    if args.val_every and step == 0 and master:  # the untrained tokens: the first point of the curve
        record({"step": 0, **validate(bb, handle, args, 0), **movement(bb, tokens, initial_tokens, handle)})
    B, pairs = args.batch, (args.batch if args.loss == "dsm" else args.batch * args.batch * (world if args.gather_text else 1))
    if master:
        print(f"{args.model} {args.loss}: {world} rank(s) on {device.type} ({precision}), {B} images x "
              f"{pairs // B} texts per rank per step, {sum(p.numel() for p in params):,} trainable numbers")
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.model} {args.loss}", disable=not master, file=sys.stdout)
    while step < args.steps:
        t0 = time.time()
        # ---- this rank's B pairs of global step `step` (a function of seed, step, rank: data.py)
        batch = data.get_batch(source, step, rank, world, B)
        with torch.no_grad():
            if "latents" in batch:  # encoding cache
                x0 = batch["latents"].to(device, dtype)
                pooled = None if batch["pooled"] is None else batch["pooled"].to(device, dtype)
                cond = models.cond_from_features(bb, batch["hidden"].to(device, dtype), pooled)
            else:
                x0 = models.encode_images(bb, batch["images"].to(device))
                cond = models.encode_prompts(bb, batch["captions"])
        captions = list(batch["captions"])
        if args.gather_text:
            cond = gather_captions(cond, rank, world)
            everyone = [None] * world
            dist.all_gather_object(everyone, captions)
            captions_cols = captions + [c for r in range(world) if r != rank for c in everyone[r]]
        else:
            captions_cols = captions
        K = len(cond["encoder_hidden_states"])  # captions per image row
        # a "mismatched" pair whose caption equals the row's own is matched: no negative (losses.py)
        exclude = None if args.loss == "dsm" else losses.duplicates(captions, captions_cols).to(device)

        # ---- one t and one eps for the whole step (the authors' codes), or one per image row; the
        # generator's seed depends on (seed, step, rank) only, so a resumed run draws the same noise
        g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([args.seed, step, rank]).generate_state(1)[0]))
        draws = B if args.noise_per_row else 1
        u = torch.rand(draws, generator=g, device=device).expand(B)
        noise = torch.randn((draws,) + tuple(x0.shape[1:]), generator=g, device=device).to(x0.dtype).expand_as(x0)
        x_t, timesteps = models.add_noise(bb, x0, noise, u)
        target = models.target(bb, x0, noise)

        # ---- the pair matrix, flattened: pair (i, j) = image row i with caption j is batch row i*K + j
        if args.loss == "dsm":
            rows = cols = torch.arange(B, device=device)
        else:
            rows = torch.arange(B, device=device).repeat_interleave(K)
            cols = torch.arange(K, device=device).repeat(B)
        x_pairs, t_pairs, cond_pairs = x_t[rows], timesteps[rows], models.index_cond(cond, cols)
        shape = (B, 1 if args.loss == "dsm" else K, *x0.shape[1:])
        with autocast:
            if args.loss == "agsm":  # the set each pair uses: psi+ if matched, psi- if not (AGSM Alg. 1 l. 7)
                matched = rows == cols
                # (the order of the two forwards does not matter: hooks.py hands a block recomputed under
                # gradient checkpointing the tokens of its own forward)
                with torch.no_grad(), handle.rows(torch.where(matched, softtokens.EMA_POS, softtokens.EMA_NEG)):
                    pred_ema = models.denoise(bb, x_pairs, t_pairs, cond_pairs).view(shape)
                with handle.rows(torch.where(matched, softtokens.POS, softtokens.NEG)):
                    pred = models.denoise(bb, x_pairs, t_pairs, cond_pairs).view(shape)
            else:
                pred = models.denoise(bb, x_pairs, t_pairs, cond_pairs).view(shape)
        errors = losses.pair_errors(pred, target)  # (B, K); dsm: (B, 1), the matched pairs
        tau = 1.0 / x0[0].numel() if args.paper_tau else args.tau   # Alg. 1 l. 8: the sum over C*H*W
        win_rate = margin = torch.zeros((), device=device)
        if args.loss == "softrepa":
            loss = losses.softrepa_loss(errors, tau, args.scale, args.dweight, exclude)
        elif args.loss == "agsm":
            loss, w = losses.agsm_loss(pred, pred_ema, target, timesteps, facts["prediction"], args.gamma_pos,
                                       args.gamma_neg, tau, args.bradley_terry, exclude, args.plain_sum)
            win_rate, margin = losses.agsm_diagnostics(w, exclude)
        else:
            loss = losses.dsm_loss(torch.diag(errors[:, 0]))  # the diagonal of the pair matrix
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()

        # ---- one all-reduce carries the token gradients and the logged numbers: every rank then holds
        # the mean gradient of the global batch and steps identically
        with torch.no_grad():
            diagonal = errors[:, 0] if args.loss == "dsm" else errors.diagonal()
            negatives = losses.mismatched(errors, exclude) if errors.shape[1] > 1 else errors.new_zeros(1)
            off = negatives.mean() if negatives.numel() else errors.new_zeros(())
            accuracy = losses.classifier_accuracy(errors, exclude) if errors.shape[1] > 1 else torch.zeros((), device=device)
            stats = torch.stack([loss.detach().float(), diagonal.mean(), off, accuracy.float(), win_rate.float(),
                                 margin.float(), torch.tensor(float(batch["new_bad"]), device=device)])
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.flatten() for g in grads] + [stats])
            if ddp:
                dist.all_reduce(flat)
                flat[:-1] /= world  # means; the last entry (new unreadable images) stays a sum
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(p)
                offset += g.numel()
            loss_mean, err_pos, err_neg, acc, win_rate, margin, new_bad = flat[offset:].tolist()
        if not math.isfinite(loss_mean):  # every rank sees the same reduced loss, so all stop together
            stop_diverged(f"loss is {loss_mean} at step {step}: stopping, tokens not updated.")
        if args.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(opt)
        scaler.update()
        lr = sched.get_last_lr()[0]
        sched.step()
        if args.loss == "agsm":
            tokens.update_ema(args.ema_decay)  # hat psi <- decay hat psi + (1 - decay) psi
        step += 1
        skipped += int(new_bad)

        # ---- log (rank 0). For agsm the in-batch accuracy is that of the training forward (psi+ on the
        # diagonal, psi- off it); the held-out accuracy (validation) ranks captions with psi+ alone.
        dt = time.time() - t0
        row = dict(step=step, loss=loss_mean, err_matched=err_pos, lr=lr, steps_per_s=1 / dt,
                   pairs_per_s=pairs * world / dt, peak_mem_gb=peak_memory_gb(device), skipped=skipped)
        if args.loss != "dsm":  # dsm computes the diagonal only: no mismatched pairs to report
            row.update(err_mismatched=err_neg, acc=acc)
        if args.loss == "agsm":  # the AGSM code's diagnostics of its Plackett-Luce weights
            row.update(win_rate=win_rate, score_margin=margin)
        if args.val_every and (step % args.val_every == 0 or step == args.steps) and master:
            row.update(validate(bb, handle, args, step))
            row.update(movement(bb, tokens, initial_tokens, handle))
            tqdm.write(f"step {step} validation: " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith(("score_mean", "heldout"))))
        record(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.4f}", acc="" if args.loss == "dsm" else f"{acc:.2f}", skipped=skipped)
        if master and (step % args.log_every == 0 or step == args.steps):
            tqdm.write(f"step {step}: loss {loss_mean:.4f} err+ {err_pos:.4f}"
                       + ("" if args.loss == "dsm" else f" err- {err_neg:.4f} acc {acc:.2f}")
                       + f" lr {lr:.2e} {1 / dt:.2f} steps/s {pairs * world / dt:.1f} pairs/s "
                       f"peak {row['peak_mem_gb']:.2f} GB skipped {skipped}")
        if step % args.ckpt_every == 0 or step == args.steps:
            # a diverged state is never saved as good: the updated tokens must be finite and give finite
            # predictions on this step's matched pairs (tokens of 1e19 are finite, and NaN in the next forward)
            with torch.no_grad(), autocast, handle.rows(torch.full((B,), softtokens.POS if args.loss == "agsm" else 0)):
                probe = models.denoise(bb, x_t, timesteps, models.index_cond(cond, torch.arange(B, device=device)))
            finite = torch.stack([torch.isfinite(p).all() for p in tokens.parameters()] + [torch.isfinite(probe).all()])
            finite = finite.all().float()
            if ddp:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
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
        log.close()
    if ddp:
        dist.destroy_process_group()
    return dict(tokens=tokens, step=step, skipped=skipped, out=args.out, tokens_path=tokens_path, rank=rank)


if __name__ == "__main__":
    main()
