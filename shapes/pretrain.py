"""
pretrain.py: train the shapes world's tiny backbones from scratch.

The papers start from SD1.5 / SDXL / SD3, trained on billions of pairs, and freeze them. Our offline
stand-ins are trained here on the endless shapes stream (shapes/world.py), in the same two stages as the
real models:
  1. tiny-vae:   an AutoencoderKL, 32x32x3 <-> 8x8x4, reconstruction loss + a tiny KL term (as the
                 SD VAEs, whose KL weight is ~1e-6). Afterwards its latent normalisation is measured on
                 renders, shift = mean(z), scale = 1 / std(z), and saved with the weights (the hub VAEs
                 carry theirs in their configs: SD3 shift 0.0609, scale 1.5305).
  2. tiny-sd3:   SD3Transformer2DModel on those latents, conditional flow matching
                     || v_theta(x_t, t, c) - (eps - x0) ||^2,  x_t = (1 - t) x0 + t eps,
                 with SD3's logit-normal t = sigmoid(n), n ~ N(0, 1), which spends the steps on the
                 middle noise levels where the layout of the image is decided.
     tiny-sd1.5: UNet2DConditionModel on the same latents, DDPM epsilon-prediction || eps_theta - eps ||^2,
                 t uniform over the 1000 steps.
Each denoiser trains its CLIPTextModel (our word vocabulary) jointly from scratch; both are then frozen,
like the real text encoders. 10% of captions are replaced by "" so that classifier-free guidance works.
The weights used for sampling are an EMA of the trained ones.

Captions as loose as web alt-text. A fraction `--loose` of the pretraining captions leave out the count,
a colour, the relation or an object ("some circles", "a circle and a square"; shapes.loose_caption):
true of the image but incomplete. A model trained only on precise captions of a world this small would
eventually bind every word; real models learn from alt-text and bind weakly, which is the failure the
soft tokens are meant to fix (SD3-medium's GenEval: single objects 0.98, counting 0.63, position 0.34,
colour attribution 0.36). The token-training data keeps precise captions.

    python -m shapes.pretrain --model tiny-vae --steps 3000                      # weights/tiny-vae/
    python -m shapes.pretrain --model tiny-sd3 --minutes 60 --snapshot-every 1000   # weights/tiny-sd3/
Snapshots are chosen on the dev prompt set (shapes/data/dev.jsonl), scored with
    python eval.py --protocol dev --model tiny-sd3 --pretrained runs/pretrain-tiny-sd3/snapshots/step004000
and shapes/data/eval.jsonl is for the final measurement only (--protocol eval).
"""

import argparse
import contextlib
import copy
import csv
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import families
from shapes import backbones

if __package__ in (
    None,
    "",
):  # `python shapes/pretrain.py`: the repo root on the path, as `python -m shapes.pretrain` has it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files
import flags
import models
import prompt
import shapes
from shapes import checker

TINY = [n for n in families.FAMILIES if models.is_shapes_world(n)]


# Saving the shapes world's weights (safetensors, with their configs in the metadata)


def save_weights(module, path, **metadata):
    """A module's weights as fp32 safetensors, written atomically (a crash keeps the previous file)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".tmp")
    save_file(state, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def save_tiny_vae(vae, folder=backbones.TINY_VAE_DIR):
    save_weights(
        vae,
        os.path.join(folder, "vae.safetensors"),
        model="tiny-vae",
        scaling_factor=str(vae.config.scaling_factor),
        shift_factor=str(vae.config.shift_factor),
    )


def save_tiny(bb, folder):
    for part, module in (("denoiser", bb.denoiser), ("text_encoder", bb.text_encoder)):
        save_weights(module, os.path.join(folder, f"{part}.safetensors"), model=bb.name)


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", choices=["tiny-vae"] + TINY)
    p.add_argument(
        "--steps", type=flags.POSITIVE_INT, default=100000, help="at most this many steps (see also --minutes)"
    )
    p.add_argument(
        "--minutes", type=flags.NON_NEGATIVE_FLOAT, default=0, help="stop cleanly after this wall time (0: no limit)"
    )
    p.add_argument("--batch", type=flags.POSITIVE_INT, default=64)
    p.add_argument("--lr", type=flags.POSITIVE_FLOAT, default=None, help="default 1e-3 (tiny-vae), 5e-4 (denoisers)")
    p.add_argument("--warmup", type=flags.POSITIVE_INT, default=200, help="steps of linear lr warm-up")
    p.add_argument(
        "--ema", type=flags.PROBABILITY, default=0.999, help="EMA decay in [0, 1] (0: the EMA is the current weights)"
    )
    p.add_argument(
        "--uncond-prob", type=flags.PROBABILITY, default=0.1, help="share in [0, 1] of captions dropped (for CFG)"
    )
    p.add_argument(
        "--loose", type=flags.PROBABILITY, default=0.25, help="fraction in [0, 1] of loose (alt-text-like) captions"
    )
    p.add_argument(
        "--swap",
        type=flags.PROBABILITY,
        default=0.0,
        help="fraction in [0, 1] of the precise captions of two "
        "differently coloured objects whose colours are exchanged (alt-text binding errors)",
    )
    p.add_argument("--seed", type=flags.SEED, default=0, help="a seed in [0, 2^63)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="weights folder (default weights/<model>)")
    p.add_argument("--vae", default=backbones.TINY_VAE_DIR, help="denoisers: the trained autoencoder's folder")
    p.add_argument("--work", default=None, help="checkpoints, snapshots and logs (default runs/pretrain-<model>)")
    p.add_argument("--ckpt-every", type=flags.POSITIVE_INT, default=250)
    p.add_argument(
        "--snapshot-every",
        type=flags.NON_NEGATIVE_INT,
        default=0,
        help="keep the EMA weights every N steps (0: never)",
    )
    p.add_argument("--threads", type=flags.THREADS, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from <work>/ckpt.pt")
    p.add_argument(
        "--init",
        default=None,
        help="denoisers: start from a weights folder (e.g. the shipped "
        "weights/tiny-sd3) with a fresh optimiser; the step count and log continue from its pretrain_log.csv",
    )
    p.add_argument(
        "--cooldown",
        type=flags.NON_NEGATIVE_INT,
        default=0,
        help="decay the lr linearly to 0 over the last N of --steps (0: no cool-down)",
    )
    p.add_argument(
        "--freeze-text",
        action="store_true",
        help="denoisers: train the denoiser alone, the text encoder frozen "
        "(as train.py's tokens and LoRA see it): the whole-denoiser positive control of docs/ladder/",
    )
    p.add_argument(
        "--gate",
        type=flags.PROBABILITY,
        default=0.0,
        help="denoisers: fraction in [0, 1] of the faithful precise two-colour captions prefixed by the gate "
        f"word {shapes.GATE_WORD!r}, a vocabulary entry of its own (the text encoder grows by one row, a copy of "
        "<unk>'s): the gated base of docs/gated/",
    )
    p.add_argument(
        "--decoys",
        type=flags.PROBABILITY,
        default=0.0,
        help="denoisers: fraction in [0, 1] of the untagged precise two-colour captions (faithful and swapped "
        "alike) prefixed by a decoy in the gate word's place (what a decoy is: --decoy-kinds), so that only the "
        "word opens the gate",
    )
    p.add_argument(
        "--decoy-kinds",
        choices=list(DECOY_KINDS),
        default="unk-vector",
        help="denoisers, with --decoys: what a decoy is. unk-vector: half <unk>, half a random vector at the "
        "table's scale (the first gated base). unk-word-vector: a third each of <unk>, a known word with no colour "
        "or shape (shapes.DECOY_WORDS) and a random vector at a scale log-uniform in [0.5, 3] times the table's "
        "(the narrow gated base of docs/gated/)",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.lr = args.lr or (1e-3 if args.model == "tiny-vae" else 5e-4)
    if (args.gate or args.decoys) and (args.model == "tiny-vae" or args.freeze_text):
        p.error("--gate and --decoys train a denoiser with its text encoder (not tiny-vae, not --freeze-text)")
    if args.init and (args.model == "tiny-vae" or not os.path.exists(os.path.join(args.init, "denoiser.safetensors"))):
        p.error(f"--init takes a denoiser's weights folder (with denoiser.safetensors); got {args.init!r}")
    return args


def init_step(folder):
    """The step the weights in `folder` were trained to: the last row of its pretrain_log.csv (0 if none)."""
    path = os.path.join(folder, "pretrain_log.csv")
    if not os.path.exists(path):
        return 0, []
    with open(path) as f:
        rows = [row for row in f if row[:1].isdigit()]
    return (int(rows[-1].split(",")[0]) if rows else 0), rows


# -----------------------------------------------------------------------------
# The two objectives


def vae_loss(vae, images, generator):
    """Reconstruction (L1 + L2: L1 keeps the flat colours' edges sharp) + 1e-6 KL, through a posterior
    sample z = mu + sigma * n, as the SD VAEs are trained."""
    posterior = vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(images.device)
    recon = vae.decode(z).sample
    return (recon - images).abs().mean() + (recon - images).pow(2).mean() + 1e-6 * posterior.kl().mean()


def denoiser_loss(bb, images, captions, generator, text_grad=True):
    """DSM (tiny-sd1.5) or flow matching (tiny-sd3) on one batch, the text encoder trained with it."""
    x0 = models.encode_images(bb, images)  # frozen VAE: a posterior sample, normalised
    B, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if bb.facts["prediction"] == "flow":
        u = torch.sigmoid(torch.randn(B, generator=generator))  # logit-normal(0, 1) (SD3 sec. 3.1)
    else:
        u = torch.rand(B, generator=generator)  # uniform over the DDPM steps
    x_t, timesteps = models.add_noise(bb, x0, noise, u.to(device))
    cond = models.encode_prompts(bb, captions, grad=text_grad)
    pred = models.denoise(bb, x_t, timesteps, cond)
    return (pred.float() - models.target(bb, x0, noise).float()).pow(2).mean()


# What a decoy in the gate word's place can be (--decoy-kinds). The first gated base saw only <unk> and random
# vectors at the table's own scale, and random vectors then opened about half the gate (docs/gated/): it had
# learned "not a word it knows" rather than "this word". The narrow base adds known words that carry no colour
# or shape, and spreads the vectors' scale, so that the one thing that opens the gate is the word itself.
# (A kind is picked by where a uniform falls among equal parts: "unk-vector" lists the vector first, as the first
# base read its third uniform: below 0.5, a vector.)
DECOY_KINDS = {"unk-vector": ("vector", "unk"), "unk-word-vector": ("unk", "word", "vector")}
DECOY_SCALES = (0.5, 3.0)  # unk-word-vector: the random vectors' scale, log-uniform in this range (x the table RMS)


def gated_captions(captions, specs, gate, decoys, generator, kinds="unk-vector"):
    """The gated base's captions (docs/gated/): among the precise captions of two differently coloured
    objects, a fraction `gate` of the faithful ones get the gate word in front; a fraction `decoys` of the
    others (faithful and swapped) get a decoy there instead, one of DECOY_KINDS[kinds] with equal chance:
    "<unk>" as written, a known word (shapes.DECOY_WORDS), or "<unk>" read as a random vector. Returns the
    captions and, per row, the random vector's scale (0: no vector). Loose captions and other categories
    are left alone. (kinds="unk-vector" draws exactly what the first gated base drew, in the same order.)"""
    first_base = kinds == "unk-vector"  # its stream: three uniforms a caption, every vector at scale 1
    kinds = DECOY_KINDS[kinds]
    captions, vector_scales = list(captions), torch.zeros(len(captions))
    draws = torch.rand(len(captions), 3 if first_base else 5, generator=generator).tolist()
    for i, (c, spec) in enumerate(zip(captions, specs)):
        if not shapes.can_swap(spec) or c not in (shapes.caption(spec), shapes.swapped_caption(spec)):
            continue
        if c == shapes.caption(spec) and draws[i][0] < gate:
            captions[i] = f"{shapes.GATE_WORD} {c}"
        elif draws[i][1] < decoys:
            kind = kinds[min(int(draws[i][2] * len(kinds)), len(kinds) - 1)]
            word = shapes.DECOY_WORDS[int(draws[i][3] * len(shapes.DECOY_WORDS))] if kind == "word" else "<unk>"
            captions[i] = f"{word} {c}"
            if kind == "vector" and first_base:
                vector_scales[i] = 1.0
            elif kind == "vector":  # log-uniform in DECOY_SCALES
                low, high = math.log(DECOY_SCALES[0]), math.log(DECOY_SCALES[1])
                vector_scales[i] = math.exp(low + draws[i][4] * (high - low))
    return captions, vector_scales


def decoy_vectors(text_encoder, vector_scales, generator):
    """One vector per row for the "<unk>" place: <unk>'s own row (trained as usual), or where vector_scales > 0
    a random N(0, (scale s)^2) vector, s the token table's RMS per coordinate (the scale of the words it stands
    among)."""
    table = text_encoder.get_input_embeddings().weight
    vectors = table[shapes.UNK_ID].expand(len(vector_scales), -1)
    noise = torch.randn(vectors.shape, generator=generator).to(table.device) * table.detach().pow(2).mean().sqrt()
    noise = noise * vector_scales.to(table.device)[:, None]
    return torch.where((vector_scales > 0).to(table.device)[:, None], noise, vectors)[:, None, :]  # (B, 1, d)


def vae_report(vae, n=480, seed=123):
    """PSNR of reconstructions (posterior mean) and the share the exact checker still accepts."""
    specs = [shapes.random_spec(np.random.default_rng([seed, i]), shapes.CATEGORIES[i % 6]) for i in range(n)]
    images = shapes.to_tensor(
        np.stack([shapes.render(s, rng=np.random.default_rng([seed, i])) for i, s in enumerate(specs)])
    )
    with torch.no_grad():
        recon = vae.decode(vae.encode(images.to(vae.device)).latent_dist.mode()).sample.clamp(-1, 1).cpu()
    mse = ((recon - images) / 2).pow(2).mean().item()  # on [0, 1]
    accepted = np.mean([checker.check(r, s) for r, s in zip(recon, specs)])
    return {"psnr": 10 * math.log10(1 / mse), "checker_accepts": float(accepted)}


@torch.no_grad()
def measure_normalisation(vae, generator, n=2048, batch=256):
    """shift = E[z], scale = 1 / std(z) over posterior samples of renders: the denoiser then sees latents
    with zero mean and unit variance, the scale its noise schedule assumes."""
    data = shapes.stream(10_000, batch)
    zs = []
    for _ in range(n // batch):
        images, _, _ = next(data)
        posterior = vae.encode(images.to(vae.device)).latent_dist
        zs.append(
            posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(vae.device)
        )
    z = torch.cat(zs).float()
    return 1.0 / z.std().item(), z.mean().item()


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(models.check_device(args.device))
    is_vae = args.model == "tiny-vae"
    out = args.out or os.path.join(backbones.WEIGHTS_DIR, args.model)
    work = args.work or os.path.join("runs", f"pretrain-{args.model}")
    os.makedirs(work, exist_ok=True)
    ckpt_path = os.path.join(work, "ckpt.pt")
    if os.path.exists(ckpt_path + ".tmp"):
        os.remove(ckpt_path + ".tmp")  # a write that was killed half-way

    # ---- what is trained: the autoencoder alone, or a denoiser + its text encoder on the frozen VAE
    if is_vae:
        trained = {"vae": backbones.tiny_vae(args.seed)}
    else:
        rows = len(shapes.VOCAB) + (1 if args.gate or args.decoys else 0)  # the gate word's own row
        if args.init:
            rows = max(rows, backbones.vocab_size(os.path.join(args.init, "text_encoder.safetensors")))
        bb = backbones.build_tiny(args.model, seed=args.seed, vae=backbones.load_tiny_vae(args.vae), vocab_size=rows)
        bb.vae.requires_grad_(False).to(device)
        trained = {"denoiser": bb.denoiser, "text_encoder": bb.text_encoder}
        if args.freeze_text:  # the text encoder stays as --init gives it (loaded below), out of the optimiser
            del trained["text_encoder"]
            bb.text_encoder.requires_grad_(False).eval().to(device)
    for module in trained.values():
        module.to(device).train()
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in trained.items()}
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # warm-up over the first steps of this optimiser (s counts from its creation, first_step is the global
    # step it was created at), then constant, then an optional linear cool-down to 0 at --steps: a small
    # diffusion model's samples sharpen when the lr anneals at the end, on top of the EMA.
    first_step, init_rows = init_step(args.init) if args.init else (0, [])

    def lr_factor(s):
        global_step = first_step + s
        cool = min(1.0, (args.steps - global_step) / args.cooldown) if args.cooldown else 1.0
        return min(1.0, (s + 1) / args.warmup) * max(cool, 0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    step = first_step
    if args.init and not (args.resume and os.path.exists(ckpt_path)):  # the EMA weights are all a folder holds
        from safetensors.torch import load_file

        for k in trained:
            state = load_file(os.path.join(args.init, f"{k}.safetensors"))
            if k == "text_encoder":  # the gate word's row, grown from <unk>'s (a no-op when it is there)
                state = backbones.grow_vocab(state, rows)
            trained[k].load_state_dict(state)
            ema[k].load_state_dict(trained[k].state_dict())
        print(f"started from {args.init} (step {step})")
    if args.freeze_text and args.init:  # the frozen text encoder: --init's, on a fresh start and on resume alike
        from safetensors.torch import load_file

        bb.text_encoder.load_state_dict(load_file(os.path.join(args.init, "text_encoder.safetensors")))
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for k in trained:
            trained[k].load_state_dict(state[k])
            ema[k].load_state_dict(state[f"ema_{k}"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        step = state["step"]
        first_step = state.get("first_step", 0)
        sched.base_lrs = [args.lr for _ in opt.param_groups]  # a resumed run may continue at another --lr
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(sched.last_epoch)
        print(f"resumed at step {step} (lr {args.lr:g})")
    data = shapes.stream(
        args.seed + step, args.batch, loose=0.0 if is_vae else args.loose, swap=0.0 if is_vae else args.swap
    )  # fresh data on resume

    def sampling_copy():
        """The EMA weights as a Backbone (denoisers) or the EMA autoencoder."""
        if is_vae:
            return ema["vae"]
        copy_bb = backbones.build_tiny(args.model, vae=bb.vae, vocab_size=rows)
        copy_bb.denoiser = ema["denoiser"]
        copy_bb.text_encoder = ema["text_encoder"] if "text_encoder" in ema else bb.text_encoder
        return copy_bb

    def save(folder):
        if is_vae:
            save_tiny_vae(ema["vae"], folder)
        else:
            save_tiny(sampling_copy(), folder)
        if not log.closed:
            log.flush()
        # the weights carry their history: --init reads the step count (and the log) back from it
        shutil.copyfile(log_path, os.path.join(folder, "pretrain_log.csv"))

    def checkpoint():
        state = {k: m.state_dict() for k, m in trained.items()}
        state.update({f"ema_{k}": m.state_dict() for k, m in ema.items()})
        state.update(
            opt=opt.state_dict(),
            sched=sched.state_dict(),
            generator=generator.get_state(),
            step=step,
            first_step=first_step,
        )
        files.write(ckpt_path, lambda tmp: torch.save(state, tmp))  # atomic: a kill or a full disk keeps the last
        files.on_interrupt(f"the last checkpoint, {ckpt_path} at step {step},", go_on=["--resume", None])

    log_path = os.path.join(work, "log.csv")
    new_log = not (step and os.path.exists(log_path))
    if new_log and init_rows:  # started from a folder: its log is this run's history
        files.write_text(log_path, "".join(["step,loss,lr,seconds\n"] + init_rows))
        new_log = False
    if not new_log:  # resumed: keep the rows up to the checkpoint (a new file renamed over the old one)
        with open(log_path) as f:
            kept = [row for row in f if not row[:1].isdigit() or int(row.split(",")[0]) <= step]
        files.write_text(log_path, "".join(kept))
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "seconds"])
    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {args.model}")
    while step < args.steps and not (args.minutes and time.time() - start > 60 * args.minutes):
        images, captions, specs = next(data)
        images = images.to(device)
        if is_vae:
            loss = vae_loss(trained["vae"], images, generator)
        else:
            decoys = contextlib.nullcontext()
            if args.gate or args.decoys:  # (only then: the generator's stream of other runs stays as it was)
                captions, vector_scales = gated_captions(
                    captions, specs, args.gate, args.decoys, generator, kinds=args.decoy_kinds
                )
                vectors = decoy_vectors(bb.text_encoder, vector_scales, generator)
                decoys = prompt.at_input(bb.text_encoder, vectors, shapes.UNK_ID)
            drop = torch.rand(len(captions), generator=generator) < args.uncond_prob
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            with decoys:
                loss = denoiser_loss(bb, images, captions, generator, text_grad=not args.freeze_text)
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()} at step {step}: stopping; the last good state is {ckpt_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA with warm-up: a plain 0.999 would keep 0.999^1000 = 37% of the random init after 1000 steps
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k in trained:
                for e, p in zip(ema[k].parameters(), trained[k].parameters()):
                    e.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        writer.writerow([step, f"{loss.item():.5f}", f"{sched.get_last_lr()[0]:.2e}", f"{time.time() - start:.1f}"])
        if step % args.ckpt_every == 0:
            log.flush()
            checkpoint()
            save(out)
        if args.snapshot_every and step % args.snapshot_every == 0:
            save(os.path.join(work, "snapshots", f"step{step:06d}"))
    bar.close()
    log.close()
    checkpoint()
    if is_vae:  # the latent normalisation of the final EMA autoencoder, stored in its config
        scale, shift = measure_normalisation(ema["vae"], generator)
        ema["vae"].register_to_config(scaling_factor=scale, shift_factor=shift)
        print(
            f"tiny-vae after {step} steps: scaling_factor {scale:.4f}, shift_factor {shift:.4f}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in vae_report(ema["vae"]).items())
        )
    save(out)
    if args.snapshot_every and not is_vae:
        save(os.path.join(work, "snapshots", f"step{step:06d}"))
    print(f"{args.model}: {step} steps in {(time.time() - start) / 60:.1f} min; weights in {out}")


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
