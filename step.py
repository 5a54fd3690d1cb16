"""
step.py: one training step of the soft tokens -- SoftREPA (eq. 14, Alg. 1), AGSM (Alg. 1) and plain
score matching on the matched pairs (dsm, AGSM Table 4 (i)) -- for every backbone. train.py runs it
in a loop; bench.py times it. Read `train_step` beside the two algorithms: each loss is one explicit
branch, top to bottom.

    batch -> pair matrix -> forward(s) -> loss -> backward -> all-reduce -> AdamW -> EMA

The pair matrix. B images x0^i and their captions c^i (data.py). Every image meets every caption:
the B x K matrix of pairs (K = B, or world * B with --gather-text), the matched pairs (i, i) on its
diagonal. One noise level t and one noise eps for the whole step, as both authors' codes do
(torch.randint(min_t, max_t, (1,)); AGSM Alg. 1 lines 4-5); with --noise-per-row each image row
draws its own. Either way only the caption differs along a row, so the errors of a row compare
captions and nothing else. A caption that repeats the row's own is no negative (losses.duplicates).

Rows per forward. Both losses are sums over image rows (losses.py: each row's share is fixed by its
own pairs and by counts of the whole matrix), so the rows can go through the frozen denoiser a few
at a time -- forward, loss, backward, the gradients adding up in .grad -- and the step is the same
step as the unchunked one (tests/method/test_step.py checks it). This is the authors' --nrows, which is
what makes SD3 at the papers' batch fit a GPU (docs/real-models.md). (Their chunks each draw fresh
noise and scale the loss per chunk, so their step changes with --nrows; ours does not.)

DDP inline (nanoGPT): each rank draws its own images; one all-reduce averages the token gradients and
the logged numbers, so every rank takes the same optimizer step and the tokens stay identical.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import losses
import models
import prompt
import softtokens

# -----------------------------------------------------------------------------
# The pieces of a step

# The frozen encoders run under no_grad: their outputs are inputs of the step, never trained.


def encode_batch(bb, batch, trained=None):
    """x0 (latents) and the text kwargs of a data.get_batch batch: encoded by the frozen VAE and text
    encoders, or read from the encoding cache (data.py), which stores exactly those. A learned prompt
    (`trained` a prompt.Prompt, train.py --params prompt) is read by the text encoder with gradient."""
    device, dtype = bb.device, bb.dtype
    if isinstance(trained, prompt.Prompt):
        with torch.no_grad():
            x0 = models.encode_images(bb, batch["images"].to(device), mode=True)
        return x0, trained.encode(bb, list(batch["captions"]))
    with torch.no_grad():
        if "latents" in batch:
            pooled = None if batch["pooled"] is None else batch["pooled"].to(device, dtype)
            return batch["latents"].to(device, dtype), models.cond_from_features(
                bb, batch["hidden"].to(device, dtype), pooled
            )
        # the posterior mean, as the cache stores it (one latent per image): training from images and
        # from its cache take the same steps, and a run's data is a function of its seed alone
        return (
            models.encode_images(bb, batch["images"].to(device), mode=True),
            models.encode_prompts(bb, list(batch["captions"])),
        )


def gather_text(cond, captions, rank, world):
    """Every rank's captions as more negatives (SoftREPA's gathered text), this rank's first, so that the
    matched pairs stay on the diagonal. Returns the widened text kwargs and the column captions."""

    def gather(value):
        if isinstance(value, dict):
            return {k: gather(v) for k, v in value.items()}
        parts = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat([parts[rank]] + parts[:rank] + parts[rank + 1 :])

    everyone = [None] * world
    dist.all_gather_object(everyone, captions)
    return gather(cond), captions + [c for r in range(world) if r != rank for c in everyone[r]]


# The noise. Both codes draw one t and one eps per step and use them for every pair of the matrix; then
# the only difference between the pairs of an image row is the caption, and the row's errors rank the
# captions with nothing else in the way (SoftREPA eqs. 15-18: the error is a log-likelihood up to a
# constant). The generator is seeded by (seed, step, rank), which is what makes resuming exact.


def draw_noise(bb, x0, seed, step, rank, per_row=False):
    """x_t, timesteps and the regression target. The generator's seed is a function of (seed, step,
    rank) only, so a resumed run draws the same noise as an uninterrupted one."""
    B, device = x0.shape[0], x0.device
    g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
    draws = B if per_row else 1
    u = torch.rand(draws, generator=g, device=device).expand(B)
    noise = torch.randn((draws,) + tuple(x0.shape[1:]), generator=g, device=device).to(x0.dtype).expand_as(x0)
    x_t, timesteps = models.add_noise(bb, x0, noise, u)
    return x_t, timesteps, models.target(bb, x0, noise)


def autocast(bb):
    """bf16 / fp16 autocast when the backbone was loaded in that dtype (train.py --precision)."""
    return torch.autocast(bb.device.type, dtype=bb.dtype) if bb.dtype != torch.float32 else nullcontext()


# The numbers every step logs (log.csv, in this order): the loss; the mean error of the matched and of the
# mismatched pairs (err+ below err- is what alignment looks like); the in-batch classifier accuracy; AGSM's
# win rate and score margin; the counting loss's squared count error; and newly met unreadable images.
STATS = ["loss", "err_matched", "err_mismatched", "acc", "win_rate", "score_margin", "count_error", "new_bad"]


@torch.no_grad()
def step_stats(loss, errors, exclude, diagnostics, new_bad, count_error=None):
    """The STATS of one step as a tensor: the loss, the mean error of matched and mismatched pairs, the
    in-batch classifier accuracy, AGSM's (win rate, margin) `diagnostics` (None: 0), the squared count
    error of the counting loss (None: 0), newly met unreadable images."""
    zero = errors.new_zeros(())
    pairs = errors.shape[1] > 1  # dsm: the matched pairs only
    negatives = losses.mismatched(errors, exclude) if pairs else errors.new_zeros(0)
    return torch.stack(
        [
            loss.detach().float(),
            errors.diagonal().mean() if pairs else errors.mean(),
            negatives.mean() if negatives.numel() else zero,
            losses.classifier_accuracy(errors, exclude).float() if pairs else zero,
            *((zero, zero) if diagnostics is None else (d.float() for d in diagnostics)),
            zero if count_error is None else count_error.float(),
            torch.tensor(float(new_bad), device=errors.device),
        ]
    )


# DDP without DistributedDataParallel: the trainable parameters are a few tensors of tokens, so one
# flat all-reduce of their gradients and the logged numbers after backward is all that DDP would do
# here, in one place a reader can see (nanoGPT wraps the model; ours has nothing to wrap).


@torch.no_grad()
def all_reduce_mean(params, stats, world):
    """One all-reduce carries the token gradients and the logged numbers: every rank then holds the mean
    gradient of the global batch. The last stat (newly met unreadable images) stays a sum."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [stats])
    if world > 1:
        dist.all_reduce(flat)
        flat[:-1] /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p)
        offset += g.numel()
    return flat[offset:].tolist()


# Distillation (train.py --distill-prefix WORD, dsm only; docs/gated/): the regression target is not the
# data's eps - x0 but the frozen model's own prediction for the caption with WORD in front, nothing trained
# attached. It asks whether the trained numbers can *express* what the word does, whatever a loss on data
# would find: the best they can do on this objective is to reproduce the word's effect.


@torch.no_grad()
def distill_target(bb, handle, args, captions, x_t, timesteps):
    """The frozen model's prediction for WORD + each caption (None without --distill-prefix)."""
    word = getattr(args, "distill_prefix", None)
    if not word:
        return None
    cond = models.encode_prompts(bb, [f"{word} {c}" for c in captions])
    plain = None if args.params == "prompt" else torch.full((len(captions),), -1)  # the base, no tokens / adapters
    with autocast(bb), handle.rows(plain):
        return models.denoise(bb, x_t, timesteps, cond).float()


# -----------------------------------------------------------------------------
# The step


def train_step(bb, tokens, handle, opt, sched, scaler, args, batch, step, rank=0, world=1, counter=None):
    """One optimizer step of the tokens (or LoRA adapters, lora.py) on this rank's `batch` at global step
    `step`. `args` holds the recipe (train.py's resolved flags); `counter`, with args.count_weight, adds
    SoftREPA's counting loss (losses.py). Returns the logged numbers, averaged over ranks; with
    stats["diverged"] the loss was not finite and the parameters were not updated."""
    device = bb.device
    x0, cond = encode_batch(bb, batch, tokens)  # frozen VAE and text encoders (or the cache)
    captions = columns = list(batch["captions"])
    if args.gather_text and world > 1:  # the other ranks' captions as more negatives (one rank: none to add)
        cond, columns = gather_text(cond, captions, rank, world)
    B, K = x0.shape[0], len(columns)
    # (B, K): captions repeating the row's own are no negatives. Built and counted on the CPU, before the
    # move: counting on the GPU would make every step wait for it.
    exclude = losses.duplicates(captions, columns)
    n_negatives = losses.negative_count(B, K, exclude)  # AGSM's mismatched mean (counted on the CPU)
    exclude = exclude.to(device)
    x_t, timesteps, target = draw_noise(bb, x0, args.seed, step, rank, args.noise_per_row)
    # the temperature of the error softmax: the codes' constant, or AGSM Alg. 1 line 8's plain sum over
    # the C*H*W elements of the squared error (our errors are per-element means: tau = 1 / (C H W))
    tau = 1.0 / x0[0].numel() if args.paper_tau else args.tau
    # the counting loss's targets (SoftREPA app. D), read on the CPU: each caption's (count, object) or None
    asks = [losses.prompt_count(c) for c in captions] if args.count_weight else [None] * B
    teacher = distill_target(bb, handle, args, captions, x_t, timesteps)

    opt.zero_grad(set_to_none=True)
    chunk = args.rows_per_forward or B  # image rows per forward (--rows-per-forward)
    loss_sum, row_errors, row_weights, count_errors = 0.0, [], [], []
    for first in range(0, B, chunk):
        rows = torch.arange(first, min(first + chunk, B), device=device)  # global image-row indices
        n = len(rows)
        with autocast(bb):
            if args.loss == "dsm":
                # ---- plain score / flow matching (AGSM Table 4 (i)): the n matched pairs (i, i) alone, with
                # the one token set; the loss is the mean over the B rows of || pred(x_t^i, c^i) - target_i ||^2
                with handle.rows(None):  # every row: the one token set (or the LoRA adapters)
                    pred = models.denoise(bb, x_t[rows], timesteps[rows], models.index_cond(cond, rows))
                goal = target[rows] if teacher is None else teacher[rows]
                errors = losses.pair_errors(pred.unsqueeze(1), goal)  # (n, 1)
                loss = losses.dsm_loss(errors=errors, batch_rows=B)
            elif args.loss == "softrepa":
                # ---- SoftREPA (Alg. 1; eqs. 9-14): each image row i against all K captions, in one batched
                # forward of n x K pairs with the soft tokens prepended (hooks.py). The error of pair (i, j) is
                # || v_theta(x_t^i, t, c^j) - v_i ||^2 (eq. 11); the logits exp(-err / tau) (eq. 13) go into a
                # cross-entropy whose label is the matched caption (eq. 14).
                pair_rows, pair_cols = rows.repeat_interleave(K), torch.arange(K, device=device).repeat(n)
                with handle.rows(None):  # every pair: the one token set (or the LoRA adapters)
                    pred = models.denoise(bb, x_t[pair_rows], timesteps[pair_rows], models.index_cond(cond, pair_cols))
                errors = losses.pair_errors(pred.view(n, K, *x0.shape[1:]), target[rows])  # (n, K)
                loss = losses.softrepa_loss(
                    errors=errors,
                    tau=tau,
                    scale=args.scale,
                    dweight=args.dweight,
                    exclude=exclude[rows],
                    rows=rows,
                    batch_rows=B,
                )
            elif args.loss == "agsm":
                # ---- AGSM (Alg. 1; lines 4-6, t, eps and x_t, are draw_noise above). Line 7: psi+ on the
                # matched pairs, psi- on the mismatched ones -- one batched forward, the token set chosen per
                # pair (handle.rows).
                pair_rows, pair_cols = rows.repeat_interleave(K), torch.arange(K, device=device).repeat(n)
                matched = pair_rows == pair_cols
                shape = (n, K, *x0.shape[1:])
                # Lines 8-9 need the EMA tokens' predictions of the same pairs, without gradient: they make
                # the targets. (The order of the two forwards does not matter: hooks.py hands a block
                # recomputed under gradient checkpointing the tokens of its own forward.)
                ema_sets = torch.where(matched, softtokens.EMA_POS, softtokens.EMA_NEG)
                with torch.no_grad(), handle.rows(ema_sets):
                    pred_ema = models.denoise(
                        bb, x_t[pair_rows], timesteps[pair_rows], models.index_cond(cond, pair_cols)
                    ).view(shape)
                with handle.rows(torch.where(matched, softtokens.POS, softtokens.NEG)):
                    pred = models.denoise(
                        bb, x_t[pair_rows], timesteps[pair_rows], models.index_cond(cond, pair_cols)
                    ).view(shape)
                # Lines 8-12 (losses.agsm_loss): Plackett-Luce weights w of the EMA errors, the guided targets
                # v_i + gamma_ij (v_ema(i, j) - sum_k w_ik v_ema(i, k)), and the regression of psi+ / psi- onto
                # them: the matched mean plus the mismatched mean over the whole matrix.
                loss, w, _ = losses.agsm_loss(
                    pred=pred,
                    pred_ema=pred_ema,
                    target=target[rows],
                    gamma_pos=args.gamma_pos,
                    gamma_neg=args.gamma_neg,
                    tau=tau,
                    bradley_terry=args.bradley_terry,
                    exclude=exclude[rows],
                    plain_sum=args.plain_sum,
                    rows=rows,
                    batch_rows=B,
                    n_negatives=n_negatives,
                )
                errors = losses.pair_errors(pred, target[rows])  # logged: psi+ / psi- errors
                row_weights.append(w)
            else:
                raise ValueError(f"unknown loss {args.loss!r}")
            chunk_asks = asks[first : first + n]
            if any(chunk_asks):
                # ---- SoftREPA's counting loss (app. D; losses.py): the matched pairs' (i, i) one-step x0_hat
                # (psi+ for AGSM), decoded with gradient, counted softly; (count - asked)^2, a mean over B rows
                matched_pred = (
                    pred
                    if args.loss == "dsm"
                    else pred.view(n, K, *x0.shape[1:])[torch.arange(n, device=device), rows]
                )
                x0_hat = losses.one_step_x0(
                    matched_pred, x_t[rows], timesteps[rows], bb.facts["prediction"], bb.alphas_cumprod
                )
                images = models.decode_latents(bb, x0_hat.to(bb.dtype), grad=True)
                asked = torch.tensor([a[0] if a else float("nan") for a in chunk_asks], device=device)
                count_rows = losses.count_row_losses(
                    counter.soft_count(images, [a and a[1] for a in chunk_asks]), asked
                )
                loss = loss + args.count_weight * count_rows.sum() / B
                count_errors.append(count_rows.detach())
        # the gradient w.r.t. the tokens only (the backbone is frozen); chunks add up in .grad
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        row_errors.append(errors.detach())

    # ---- the logged numbers and the gradients, averaged over ranks in one all-reduce
    errors = torch.cat(row_errors)  # (B, K), or (B, 1) for dsm
    diagnostics = losses.agsm_diagnostics(torch.cat(row_weights), exclude) if row_weights else None
    params = tokens.trainable()
    counted = sum(a is not None for a in asks)  # logged: the mean over the rows with a count
    count_error = torch.cat(count_errors).sum() / counted if count_errors else None
    stats = step_stats(loss_sum, errors, exclude, diagnostics, batch["new_bad"], count_error)
    out = dict(zip(STATS, all_reduce_mean(params, stats, world)), lr=sched.get_last_lr()[0])
    if not math.isfinite(out["loss"]):  # every rank sees the same reduced loss, so all stop together
        return dict(out, diverged=True)

    # ---- the update: AdamW on the tokens, the schedule, and AGSM's EMA tokens
    if args.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    if args.loss == "agsm":
        tokens.update_ema(args.ema_decay)  # AGSM: hat psi <- decay hat psi + (1 - decay) psi
    out["probe"] = (x_t, timesteps, cond)  # for finite_after_update, at checkpoints only
    return out


@torch.no_grad()
def finite_after_update(bb, tokens, handle, args, probe, world=1):
    """A diverged state is never saved as good: the tokens must be finite and give finite predictions on
    the last step's matched pairs (tokens of 1e19 are finite, and NaN in the next forward). All ranks agree."""
    x_t, timesteps, cond = probe
    cond = models.index_cond(cond, torch.arange(len(x_t), device=x_t.device))  # own captions (gathered: first B)
    with autocast(bb), handle.rows(torch.full((len(x_t),), softtokens.POS)):  # psi+, or the one set
        prediction = models.denoise(bb, x_t, timesteps, cond)
    finite = torch.stack([torch.isfinite(p).all() for p in tokens.parameters()] + [torch.isfinite(prediction).all()])
    finite = finite.all().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
