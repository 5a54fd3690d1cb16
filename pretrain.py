"""
pretrain.py: train the shapes world's tiny backbones from scratch (issue "the shapes world").

The papers start from SD1.5 / SDXL / SD3, trained on billions of pairs, and freeze them. Our offline
stand-ins are trained here, on the endless shapes stream (shapes.py), as those models were:
  tiny-sd3:   SD3Transformer2DModel, conditional flow matching  || v_theta(x_t, t, c) - (eps - x0) ||^2
  tiny-sd1.5: UNet2DConditionModel, DDPM epsilon-prediction     || eps_theta(x_t, t, c) - eps ||^2
each with its CLIPTextModel (our word vocabulary) trained jointly from scratch and then frozen, like
the real text encoders. 10% of captions are replaced by "" so that classifier-free guidance works.
The weights used for sampling are an EMA of the trained ones.

We stop on purpose before alignment is solved (single objects and colours mostly right; counting,
position and colour attribution clearly not) so that the soft tokens have room to improve it.

    python pretrain.py --model tiny-sd3 --steps 6000        # writes weights/tiny-sd3/*.safetensors
"""
import argparse
import copy
import csv
import os
import time

import torch
from tqdm import tqdm

import models
import shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", choices=[n for n in models.FAMILIES if n.startswith("tiny-")])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="weights folder (default weights/<model>)")
    p.add_argument("--work", default=None, help="checkpoints and logs (default runs/pretrain-<model>)")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=0, help="score the eval set every N steps (0: at the end)")
    p.add_argument("--eval-n", type=int, default=20, help="eval prompts per category")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from <work>/ckpt.pt")
    return p.parse_args(argv)


def batch_loss(bb, images, captions, noise, u):
    """The pretraining objective on one batch: DSM or flow matching, text encoder included."""
    x0 = models.encode_images(bb, images)
    x_t, timesteps = models.add_noise(bb, x0, noise, u)
    cond = models.encode_prompts(bb, captions, grad=True)
    pred = models.denoise(bb, x_t, timesteps, cond)
    return (pred.float() - models.target(bb, x0, noise).float()).pow(2).mean()


def train_step(bb, opt, images, captions, generator, uncond_prob):
    """One optimiser step of denoiser + text encoder on a batch; returns the loss before the step."""
    B = images.shape[0]
    drop = torch.rand(B, generator=generator) < uncond_prob
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    noise = torch.randn(images.shape, generator=generator)
    u = torch.rand(B, generator=generator)
    loss = batch_loss(bb, images, captions, noise, u)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return loss.item()


def evaluate(bb, n_per_category, seed=0, batch=64):
    """Sample the first n prompts of each category of the fixed eval set; exact per-category scores."""
    import sample
    records = shapes.load_eval_set()
    chosen = [r for c in shapes.CATEGORIES for r in [r for r in records if r["spec"]["category"] == c][:n_per_category]]
    images = []
    for i in range(0, len(chosen), batch):
        part = chosen[i:i + batch]
        images.append(sample.generate(bb, [r["prompt"] for r in part], [seed + i + k for k in range(len(part))]))
    return shapes.score(torch.cat(images), [r["spec"] for r in chosen])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(models.WEIGHTS_DIR, args.model)
    work = args.work or os.path.join("runs", f"pretrain-{args.model}")
    os.makedirs(work, exist_ok=True)
    ckpt_path = os.path.join(work, "ckpt.pt")

    bb = models.build_tiny(args.model, seed=args.seed)
    bb.denoiser.train()
    bb.text_encoder.train()
    params = list(bb.denoiser.parameters()) + list(bb.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = lambda s: min(1.0, (s + 1) / args.warmup)  # noqa: E731  linear warm-up, then constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema = copy.deepcopy(bb)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        bb.denoiser.load_state_dict(state["denoiser"])
        bb.text_encoder.load_state_dict(state["text_encoder"])
        ema.denoiser.load_state_dict(state["ema_denoiser"])
        ema.text_encoder.load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"resumed at step {step}")
    data = shapes.stream(args.seed + step, args.batch)  # a resumed run continues on fresh data

    def save_checkpoint():
        state = dict(denoiser=bb.denoiser.state_dict(), text_encoder=bb.text_encoder.state_dict(),
                     ema_denoiser=ema.denoiser.state_dict(), ema_text_encoder=ema.text_encoder.state_dict(),
                     opt=opt.state_dict(), sched=sched.state_dict(), generator=generator.get_state(), step=step)
        torch.save(state, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        models.save_tiny(ema, out)

    log = open(os.path.join(work, "log.csv"), "a", newline="")
    writer = csv.writer(log)
    if step == 0:
        writer.writerow(["step", "loss", "lr", "seconds"] + [f"score_{c}" for c in shapes.CATEGORIES] + ["score_mean"])
    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {args.model}")
    while step < args.steps:
        images, captions, _ = next(data)
        loss = train_step(bb, opt, images, captions, generator, args.uncond_prob)
        if not torch.isfinite(torch.tensor(loss)):
            raise SystemExit(f"loss is {loss} at step {step}: stopping; last good weights are in {ckpt_path}")
        sched.step()
        # EMA with warm-up: a plain 0.999 would keep 0.999^1000 = 37% of the random init after 1000 steps,
        # and a blend of weights (unlike a blend of outputs) that far apart draws noise.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(list(ema.denoiser.parameters()) + list(ema.text_encoder.parameters()), params):
                e.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        scores = {}
        if args.eval_every and step % args.eval_every == 0:
            ema.denoiser.eval()
            ema.text_encoder.eval()
            scores = evaluate(ema, args.eval_n)
            tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        writer.writerow([step, f"{loss:.5f}", f"{sched.get_last_lr()[0]:.2e}", f"{time.time() - start:.1f}"]
                        + [f"{scores[c]:.3f}" if scores else "" for c in shapes.CATEGORIES + ["mean"]])
        log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint()
    bar.close()
    ema.denoiser.eval()
    ema.text_encoder.eval()
    scores = evaluate(ema, args.eval_n)
    print(f"{args.model} after {step} steps: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
