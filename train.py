"""
train.py: train soft tokens on a frozen text-to-image diffusion model -- SoftREPA's contrastive loss
(SoftREPA sec. 3, eq. 14), AGSM's alignment-guided score matching (AGSM sec. 3, Alg. 1), or plain score
matching on the matched pairs (dsm, AGSM Table 4 (i)) -- for SD1.5, SDXL, SD3 and the shapes world.

    python train.py --model tiny-sd3 --loss agsm                                     # one process, CPU
    torchrun --nproc_per_node=2 train.py --model sd3 --loss agsm --data /data/coco   # 2 GPUs, nccl
    torchrun --nproc_per_node=2 train.py --model tiny-sd3 --loss agsm                # 2 CPU cores, gloo

What is trained. Only the soft tokens (softtokens.py): a few learnable text-stream positions that the
hooks (hooks.py) prepend to the text of the first blocks of the frozen denoiser. Nothing of the backbone
changes, so a token file is a few hundred kB and can be taken off again (sample.py --no-tokens). For
SoftREPA's comparison (its Table 3), --params lora trains LoRA adapters instead, with the same step (lora.py).

The step -- batch, pair matrix, forward(s), loss, backward, all-reduce, AdamW, EMA -- is
step.train_step (step.py, one explicit branch per loss beside the papers' algorithms). This file is
the loop around it, read top to bottom, as nanoGPT's train.py:
    flags -> DDP -> the recipe (a resumed checkpoint's, then recipe.py's defaults per family and loss) -> the
    run folder -> data -> backbone and tokens -> AdamW and the authors' schedule -> resume -> logging -> the
    loop -> the tokens file.
main() reads in that order; each setup step it calls is a function below the flags, named for what it does.
AdamW on the tokens only, lr 1e-3, wd 1e-4 (SoftREPA Table 5, AGSM Table 11 and both codes).

Nothing is lost (run.py, the run's bookkeeping). Checkpoints are written atomically; a diverged update is
never saved (step 0 is saved first); a run that stopped on NaN continues from its last good checkpoint
with a lower --lr; a second run into the same --out is refused while the first lives. --resume latest
continues the same run exactly: the data and the noise of a step are functions of (seed, step, rank)
alone, and the checkpoint holds tokens, EMA, optimizer, scheduler and the step.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import counting
import data
import families
import files
import flags
import hooks
import lora
import models
import prompt
import recipe
import run
import softtokens
import whole
from families import FAMILIES
from losses import DEFAULT_LOSS, LOSSES
from shapes import backbones, checker, classifier, pairs
from shapes import world as shapes_world
from step import STATS, finite_after_update, train_step

# -----------------------------------------------------------------------------
# The flags. The backbone's (models.add_backbone_flags: --model, --pretrained, --device, --precision, --threads,
# --max-sequence-length, shared with every script), every setting of the run (recipe.py: each declared once, with
# its domain, default or rule, help and what a resumed run does with it -- the backbone's flags included), and the
# run folder's two (--out, --resume).


def build_parser():
    """The command line. Every setting defaults to None so that resolve can tell "not given" (take the
    recipe's default, or the checkpoint's on --resume) from "given" (use it, or refuse it on a resume that
    contradicts the run). `python train.py --help` prints this file's docstring above the flags."""
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_backbone_flags(p, precision="bf16 on CUDA, fp32 on the CPU")
    p.set_defaults(model=None, random_init=None)  # None: not given (a resumed checkpoint or the recipe says)
    recipe.add_flags(p)
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<loss>)")
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' (<out>/ckpt.pt if there is one)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def resolve(args, given=()):
    """Fill every unset setting with its default (recipe.resolve: the papers' recipe for the family and loss,
    and the authors' codes where the papers are silent: docs/choices.md), then the one-line errors that need
    the whole recipe: what trains against the loss, flags this run does not use (both in recipe.resolve), the
    data, the image size, and a pair matrix to contrast."""
    recipe.resolve(args, given)
    if args.data is None:
        raise SystemExit(f"--data is required for {args.model}: a COCO folder, a .jsonl, a folder or a cache")
    families.check_size(args.model, args.size)  # the family's image sides (every script's one rule)
    spec = LOSSES[args.loss]
    if args.params == "prompt" and args.rows_per_forward:
        raise SystemExit("--params prompt encodes the batch's captions once a step: drop --rows-per-forward")
    if spec["pairs"] == "matrix" and args.batch * (args.world if args.gather_text else 1) < 2:
        # SoftREPA and AGSM compare each image's caption with the other captions of the batch
        raise SystemExit(
            f"--loss {args.loss} contrasts each image with the other captions of its batch: with "
            f"--batch 1 there are none (the loss is 0). Pass --batch 2 or more, or --loss dsm"
        )


# The learning-rate schedule. Both codes build CosineAnnealingWarmRestarts(T_0=10, eta_min=1e-5) and call
# its step() not every iteration but every `period` iterations (SoftREPA: 500 of 30k; AGSM: --num_iter =
# 1000 of 100k). So the lr is a staircase that falls along a cosine over 10 periods, jumps back to 1e-3,
# and does so 6 (SoftREPA) or 10 (AGSM) times in a run. recipe.py scales the period with --steps so a
# short run keeps that shape. LambdaLR(lr_at_step) is the same staircase, resumable from its state_dict.


def lr_at_step(step, period, min_lr_ratio, cycle=10):
    """The lr multiplier at `step`: CosineAnnealingWarmRestarts(T_0=cycle, eta_min) stepped once every
    `period` steps, as the authors' loops do: lr = min + (max - min) (1 + cos(pi e / cycle)) / 2 with
    e = (step // period) mod cycle, constant within each period."""
    e = (step // period) % cycle
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * e / cycle)) / 2


# -----------------------------------------------------------------------------
# The setup that main() calls, one function a piece: the data, the counter, what trains, the log.


def start_ddp(args):
    """DDP, as in nanoGPT: torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE;
    nccl on CUDA, gloo on the CPU. Each rank draws its own images; step.py all-reduces the gradients, so
    every rank takes the same optimizer step and the tokens stay identical. A rank that dies takes the group
    down with it, and the run resumes from its last checkpoint. Returns (ddp, rank, world size, device)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    use_cuda = args.device.startswith("cuda")
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
    # torchrun: rank r on cuda:r; one process: the --device named (cuda:1, mps; models.check_device checked it)
    device = torch.device(args.device)
    if use_cuda:
        device = torch.device("cuda", local_rank if ddp else device.index or 0)
        torch.cuda.set_device(device)
        # cuDNN's fused attention crashed in the backward pass on FLUX.1-dev's step (an H200, torch 2.11 +
        # CUDA 13; docs/cost.md): PyTorch's flash / memory-efficient kernels take over, with the same memory
        torch.backends.cuda.enable_cudnn_sdp(False)
    return ddp, rank, world, device


def open_data(args):
    """The training pairs of --data (data.py): the shapes world's stream (shapes/pairs.py; this script's
    choice for the tiny models), a COCO folder, a .jsonl, image + .txt files, or an encoding cache of
    latents and text features (`python data.py cache`). A wrong path fails here, before the model loads."""
    if pairs.is_stream(args.data):
        return pairs.open_stream(args.data, args.size, args.seed)
    # a cache holds one family's latents and text features, and one size's: data.open_cache checks the family
    # first (its root cause), then the size; the tiny models read only their own small vocabulary, so foreign
    # captions fail here
    source = data.open_source(args.data, args.size, args.seed, workers=args.workers, model=args.model)
    if models.is_shapes_world(args.model) and source["kind"] == "files":
        pairs.check_vocabulary(source["records"], args.data)
    return source


def open_counter(args, device):
    """The counting loss's differentiable counter (SoftREPA app. D; losses.py): on the tiny models the
    shipped shapes counter (shapes/checker.py) or a shapes counter file, on a real family a transformers
    object detector from a local folder (counting.py; none can be downloaded here)."""
    if models.is_shapes_world(args.model) and (args.counter is None or args.counter.endswith(".safetensors")):
        return checker.load_counter(args.counter).to(device)  # None: the shipped one
    return counting.open_detector(args.counter, device)


def make_trainable(args, bb, lora_blocks, device, ddp):
    """(what trains, its handle). SoftREPA and dsm train one token set; AGSM two, psi+ for
    matched and psi- for mismatched pairs, and their EMA copies (softtokens.PairTokens). The same seed on
    every rank gives the same start, and the broadcast makes sure of it. The tokens stay fp32; autocast runs
    the denoiser in the backbone's dtype (step.py). The handle puts them into the denoiser's text stream
    (hooks.py; MM-DiT: the first L blocks, SoftREPA Alg. 1; UNet: the --blocks groups' cross-attention) at the
    placement the token file will carry (handle.placement), and
    `handle.rows(...)` chooses per row which set a forward uses; the stock forward is untouched.
    --params lora (lora.py; SoftREPA Table 3): W' = W + B A on the attention projections of the chosen blocks,
    B = 0 at the start (the stock model), trained by the very same step; its handle switches the adapters
    per row (adapted / plain) where the tokens' hooks switch tokens."""
    if args.params == "lora":
        trainable = lora.add(bb, args.lora_rank, lora_blocks, seed=args.seed)
        handle = lora.LoraHandle(bb.denoiser)
    elif args.params == "all":  # every weight of the denoiser (whole.py); the same step
        trainable, handle = whole.WholeParams(bb.denoiser), whole.WholeHandle(bb.denoiser)
    elif args.params == "prompt":  # vectors at the text encoder's input (prompt.py); step.encode_batch reads them
        trainable = prompt.make(bb, args.prompt_vectors, args.prompt_init, seed=args.seed)
        handle = whole.WholeHandle(bb.denoiser)  # the denoiser as it is, every row
    else:
        shape = dict(n_tokens=args.n_tokens, layers=args.layers, time_table=args.time_table, init=args.init)
        trainable = softtokens.make_tokens(bb, args.loss, seed=args.seed, ema_init=args.ema_init, **shape).to(device)
    if ddp:
        for t in trainable.parameters():
            dist.broadcast(t.data, 0)
    if args.params == "tokens":
        placement = {"groups": args.blocks.split(",")} if bb.facts["arch"] == "unet" else None  # MM-DiT: --layers
        handle = hooks.attach(bb.denoiser, trainable.sets, placement)
    if args.compile:
        bb.denoiser.compile()  # in place: the module (and the hooks on it) stay the same objects
    return trainable, handle


def open_log(args, step, master, bb, trainable, device):
    """log.csv (run.open_log) with this run's columns, fixed up front so that a resumed run appends rows of
    the same shape; and the run's one-line summary. Returns (record, with_negatives, pairs per rank).
    A step sees B images per rank. SoftREPA and AGSM pair every image with every caption of the batch:
    B x B pairs (B x world*B with --gather-text), the matched ones on the diagonal. So the papers'
    "batch 16 (4, 12)" is 4 images x 4 captions: 4 matched and 12 mismatched pairs. dsm runs the B
    matched pairs alone, which makes it the control that shows what the negatives add."""
    tiny = models.is_shapes_world(args.model)
    columns = ["step"] + STATS[:-1] + ["lr", "steps_per_s", "pairs_per_s", "peak_mem_gb", "skipped"]
    if args.val_every:  # validation (shapes/classifier.py): scores, held-out accuracy, movement
        columns += ["token_cos", "token_change", "output_change"]
        columns += [f"score_{c}" for c in shapes_world.CATEGORIES + ["mean"]] if tiny else []
        columns += ["heldout_acc"] if tiny or args.val_data else []
    record = run.open_log(args, columns, step, master)
    B, with_negatives = args.batch, LOSSES[args.loss]["pairs"] == "matrix"
    pairs_per_rank = B * B * (args.world if args.gather_text else 1) if with_negatives else B
    if master:
        numbers = sum(p.numel() for p in trainable.trainable())
        print(
            f"{args.model} {args.loss}: {args.world} rank(s) on {device.type} ({args.precision}), {B} images x "
            f"{pairs_per_rank // B} texts per rank per step, {numbers:,} trainable numbers"
        )
    return record, with_negatives, pairs_per_rank


def log_row(args, stats, *, step, skipped, seconds, pairs, device, with_negatives):
    """One row of log.csv. For agsm the in-batch accuracy is that of the training forward (psi+ on the
    diagonal, psi- off it); the held-out accuracy (validation) ranks captions with psi+ alone. dsm runs no
    mismatched pairs, so it logs none of their numbers (and no AGSM diagnostics): empty, not zero."""
    row = dict(
        step=step,
        steps_per_s=1 / seconds,
        pairs_per_s=pairs / seconds,
        peak_mem_gb=run.peak_memory_gb(device),
        skipped=skipped,
        **{k: stats[k] for k in ("loss", "err_matched", "lr")},
    )
    if with_negatives:
        row.update(err_mismatched=stats["err_mismatched"], acc=stats["acc"])
    if args.loss == "agsm":
        row.update(win_rate=stats["win_rate"], score_margin=stats["score_margin"])
    if args.count_weight:
        row.update(count_error=stats["count_error"])
    return row


def log_line(stats, row, step, with_negatives):
    """The stdout line: the loss, the matched / mismatched errors and the in-batch accuracy say at a glance
    whether the tokens are learning to tell captions apart (accuracy up, err- above err+)."""
    negatives = f" err- {stats['err_mismatched']:.4f} acc {stats['acc']:.2f}" if with_negatives else ""
    return (
        f"step {step}: loss {stats['loss']:.4f} err+ {stats['err_matched']:.4f}{negatives} lr {stats['lr']:.2e} "
        f"{row['steps_per_s']:.2f} steps/s {row['pairs_per_s']:.1f} pairs/s peak {row['peak_mem_gb']:.2f} GB "
        f"skipped {row['skipped']}"
    )


def validate(bb, handle, trainable, initial_tokens, args, step):
    """Samples and scores with the current tokens (shapes/classifier.py: a prompt grid, its shapes scores on
    tiny-*, the held-out classifier accuracy), and token_cos / token_change / output_change: how far the
    tokens moved from their start and how much they change the denoiser's output."""
    result = classifier.validate(bb, handle, args, step)
    return {**result, **softtokens.movement(bb, trainable, initial_tokens, handle, classifier.DEV_PROMPTS)}


def save_trained(args, trainable, handle, step, master):
    """The trained file (rank 0): tokens.safetensors (softtokens.save) or lora.safetensors (lora.save), with
    the run's recipe in its metadata. Returns its path."""
    facts, common = FAMILIES[args.model], dict(model=args.model, loss=args.loss, steps=step, batch=args.batch)
    common.update(world=args.world, lr=args.lr, seed=args.seed, data=args.data)
    common.update(max_sequence_length=args.max_sequence_length)  # the text stream the file was trained on
    if args.params == "all":
        path = os.path.join(args.out, "denoiser.safetensors")
        if master:
            whole.save(path, trainable, **common)
        return path
    if args.params == "prompt":
        path = os.path.join(args.out, "prompt.safetensors")
        if master:
            prompt.save(path, trainable, init=args.prompt_init, **common)
        return path
    if args.params == "lora":
        path = os.path.join(args.out, "lora.safetensors")
        if master:
            lora.save(path, trainable, facts, blocks=args.lora_blocks, count_weight=args.count_weight, **common)
        return path
    path = os.path.join(args.out, "tokens.safetensors")
    if master:
        softtokens.save(
            path,
            trainable,
            arch=facts["arch"],
            placement=handle.placement,
            gamma_pos=args.gamma_pos,
            gamma_neg=args.gamma_neg,
            dweight=args.dweight,
            ema_decay=args.ema_decay,
            **common,
        )
    return path


def main(argv=None):
    # ---- flags: every one-line error that needs no model and no data comes first
    args = parse_args(argv)  # every number's domain (flags.py) is checked here
    given = recipe.given(args)  # the settings the command line gives (the rest: the checkpoint's, the recipe's)
    models.check_backbone_flags(args)  # the model name, --device, --threads ...

    # ---- DDP (torchrun) or one process; rank 0 alone writes files and prints, every rank computes
    ddp, rank, world, device = start_ddp(args)
    master, args.world = rank == 0, world

    # ---- the recipe: on --resume the checkpoint's settings, then recipe.py's defaults for this family and loss
    # (resolve); then the run folder (run.py: writable, locked, no half-written files), made only once the
    # recipe holds. Then the data, the counter and the frozen backbone (the hub, --pretrained, or the shapes
    # world's weights: this script's choice).
    named = f"{args.model or recipe.BY_NAME['model'].default}-{args.loss or DEFAULT_LOSS}"
    args.out = args.out or os.path.join("runs", named)
    state = run.resume_config(args)
    resolve(args, given)
    models.check_backbone_flags(args)  # again: the model may have come from the checkpoint
    run.open_folder(args.out, master)
    lora_blocks = lora.parse_blocks(args.lora_blocks, FAMILIES[args.model]) if args.params == "lora" else None
    counter = open_counter(args, device) if args.count_weight else None
    source = open_data(args)
    bb = models.from_flags(args, device=device, seed=args.seed, shapes_world=backbones.load)
    families.check_size(args.model, args.size, bb=bb)  # and the sides the loaded model's positions reach
    if args.grad_checkpointing:  # recompute the frozen blocks in backward: memory for time
        bb.denoiser.enable_gradient_checkpointing()

    # ---- what trains (soft tokens, or LoRA adapters), AdamW on it and the authors' schedule; then the
    # checkpoint's state on --resume, or step 0 saved before any update: a good state to return to even if
    # the very first update diverges (a too-high --lr shows at once, and the run goes on more slowly).
    trainable, handle = make_trainable(args, bb, lora_blocks, device, ddp)
    initial_tokens = {k: v.detach().clone().cpu() for k, v in trainable.state_dict().items()}  # for `movement`
    opt = torch.optim.AdamW(trainable.trainable(), lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at_step(s, args.lr_period, args.min_lr / args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # small gradients underflow
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    saved = dict(path=ckpt_path, args=args, tokens=trainable, opt=opt, sched=sched, scaler=scaler, device=device)
    step, skipped, initial_tokens = run.resume_or_start(state, saved, initial_tokens, source, master, world)
    last_saved = step
    record, with_negatives, pairs_per_rank = open_log(args, step, master, bb, trainable, device)
    if args.val_every and step == 0 and master:  # the untrained tokens: the first point of the curve
        record({"step": 0, **validate(bb, handle, trainable, initial_tokens, args, 0)})

    # ---- the loop: a batch (a function of seed, step and rank), one step (step.train_step: the B x B pair
    # matrix, the frozen denoiser's predictions with the tokens attached, SoftREPA's cross-entropy or AGSM's
    # regression onto guided targets, backward, the all-reduce, AdamW, AGSM's EMA), the log, validation,
    # and checkpoints -- never of a diverged state.
    B = args.batch
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.model} {args.loss}", disable=not master, file=sys.stdout)
    while step < args.steps:
        t0 = time.time()
        batch = data.get_batch(source, step, rank, world, B)
        stats = train_step(bb, trainable, handle, opt, sched, scaler, args, batch, step, rank, world, counter)
        if stats.get("diverged"):  # a non-finite loss: the parameters were not updated
            stop = f"loss is {stats['loss']} at step {step}: stopping, tokens not updated."
            run.stop_diverged(stop, ckpt_path=ckpt_path, last_saved=last_saved, master=master)
        step += 1  # `step` counts the updates taken: the checkpoint's step is this
        skipped += int(stats["new_bad"])
        row = log_row(
            args,
            stats,
            step=step,
            skipped=skipped,
            seconds=time.time() - t0,
            pairs=pairs_per_rank * world,
            device=device,
            with_negatives=with_negatives,
        )
        if args.val_every and (step % args.val_every == 0 or step == args.steps) and master:
            row.update(validate(bb, handle, trainable, initial_tokens, args, step))
            shown = {k: v for k, v in row.items() if k.startswith(("score_mean", "heldout"))}
            tqdm.write(f"step {step} validation: " + " ".join(f"{k}={v:.3f}" for k, v in shown.items()))
        record(row)
        bar.update(1)
        bar.set_postfix(  # shown at the bar's next redraw (refresh=False): redraws keep to its mininterval
            loss=f"{stats['loss']:.4f}",
            acc=f"{stats['acc']:.2f}" if with_negatives else "",
            skipped=skipped,
            refresh=False,
        )
        if master and (step % args.log_every == 0 or step == args.steps):
            tqdm.write(log_line(stats, row, step, with_negatives))
        if step % args.ckpt_every == 0 or step == args.steps:
            # a diverged state is never saved as good: tokens of 1e19 are finite and NaN one forward later
            if not finite_after_update(bb, trainable, handle, args, stats["probe"], world):
                stop = f"the update of step {step} diverged (tokens or predictions not finite): not saved."
                run.stop_diverged(stop, ckpt_path=ckpt_path, last_saved=last_saved, master=master)
            bad = source.get("bad", ())
            run.save_state(
                **saved, initial_tokens=initial_tokens, step=step, skipped=skipped, bad_images=bad, world=world
            )
            last_saved = step
    bar.close()

    # ---- the trained file, with what sample.py needs to attach it again (safetensors: no code runs). An AGSM
    # token file holds psi+, psi- and their EMA copies; sampling uses psi+ on both CFG branches by default
    # (AGSM sec. 4), --ema the EMA copy, --neg-uncond psi- on the unconditional branch. A LoRA run writes
    # lora.safetensors in diffusers' LoRA format: the stock pipeline's load_lora_weights reads it too.
    tokens_path = save_trained(args, trainable, handle, step, master)
    if master:
        print(f"wrote {tokens_path} after {step} steps ({skipped} unreadable images skipped)")
    if ddp:
        dist.destroy_process_group()
    return dict(tokens=trainable, step=step, skipped=skipped, out=args.out, tokens_path=tokens_path, rank=rank)


if __name__ == "__main__":
    files.script(main)  # Ctrl-C: one line naming the last checkpoint and the command that resumes it
