"""Why tiny-sd1.5's trained tokens barely move (issue 33 item 4): numbers, against tiny-sd3.

    python docs/ladder/sd15_diagnose.py --threads 1 > docs/ladder/sd15-diagnosis.txt

1. Scale: the tokens' initial vectors (tiny-sd1.5: the BOS state of "" x m, softtokens.uncond_init;
   tiny-sd3: N(0, 0.02)) against the text states the denoiser reads, per coordinate (RMS) and per vector.
2. Steps: the sum over the run of the learning rate (train.py's schedule) is the most any coordinate can
   move under Adam (|update| <= lr per step, about); against the tokens' RMS.
3. Movement of the shipped replication tokens (docs/results/rep-*): cosine to init, |delta| per
   coordinate, relative change, for the token matrix and the time table apart.
4. The gradient that reaches the tokens at init (dsm loss, 16 batches of the training stream): its RMS
   per coordinate, and its consistency across batches (|mean g| / mean |g|), which is what Adam's
   normalised step turns into net movement.
5. Where they enter and what they change: the UNet blocks with tokens, the share of cross-attention
   mass that goes to the token positions, and the output change the tokens cause (at init, trained).
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import hooks  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import softtokens  # noqa: E402
import step as steplib  # noqa: E402
import train  # noqa: E402
import trained  # noqa: E402
from shapes import backbones, pairs  # noqa: E402


def rms(x):
    return float(x.float().pow(2).mean().sqrt())


def text_scale(bb):
    cond = models.encode_prompts(bb, ["a red circle and a blue square", "three green triangles", ""])
    h = cond["encoder_hidden_states"].float()
    return h


def lr_sum(path_config):
    """Sum and max over the run's steps of its lr (train.lr_at_step: cosine warm restarts stepped every
    lr_period steps, as in the run's config)."""
    cfg = json.load(open(path_config))
    ratio = cfg["min_lr"] / cfg["lr"]
    lrs = [cfg["lr"] * train.lr_at_step(s, cfg["lr_period"], ratio) for s in range(cfg["steps"])]
    return float(np.sum(lrs)), float(np.max(lrs))


def movement(folder, bb, model):
    """cosine / |delta| of the shipped tokens against their init (rebuilt: the init is deterministic for
    tiny-sd1.5, BOS x m; for tiny-sd3 the N(0, 0.02) draw is from the run's seed)."""
    path = os.path.join(folder, "tokens.safetensors")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    tok = trained.read(path, model).sets[0]  # psi+ for AGSM
    init = softtokens.make_tokens(bb, cfg["loss"], seed=cfg["seed"])
    init = init.pos if hasattr(init, "pos") else init
    out = {}
    for name in ("tokens", "time_table"):
        now, then = getattr(tok, name), getattr(init, name)
        if now is None:
            continue
        now, then = now.detach().float(), then.detach().float()
        d = now - then
        out[name] = dict(
            rms_init=rms(then),
            rms_delta=rms(d),
            rel_change=float(d.norm() / then.norm()),
            cos=float(torch.nn.functional.cosine_similarity(now.flatten(0, -2), then.flatten(0, -2), dim=-1).mean()),
        )
    return out


def grads(bb, model, n_batches=16, loss="dsm"):
    tokens = softtokens.make_tokens(bb, loss, seed=0)
    source = pairs.open_stream("shapes", 32, 0)
    gs = {"tokens": [], "time_table": []}
    with trained.attached(bb, trained.of_tokens(tokens.sets)) as handle:
        for k in range(n_batches):
            batch = data.get_batch(source, k, 0, 1, 4)
            x0, cond = steplib.encode_batch(bb, batch)
            x_t, t, target = steplib.draw_noise(bb, x0, 0, k, 0)
            tokens.zero_grad()
            with handle.rows(None):
                pred = models.denoise(bb, x_t, t, cond)
            errors = losses.pair_errors(pred.unsqueeze(1), target)
            errors[:, 0].mean().backward()
            gs["tokens"].append(tokens.tokens.grad.detach().clone())
            if tokens.time_table is not None:
                gs["time_table"].append(tokens.time_table.grad.detach().clone())
    out = {}
    for name, g in gs.items():
        if not g:
            continue
        g = torch.stack(g)
        nz = g.abs().sum(dim=0) > 0  # the time table: only the rows of the drawn timesteps get a gradient
        out[name] = dict(
            rms_grad=rms(g[:, nz]) if nz.any() else 0.0,
            consistency=float(g.mean(0)[nz].abs().mean() / g.abs().mean(0)[nz].mean()),
            rms_param=rms(getattr(tokens, name)),
        )
    return out


@torch.no_grad()
def attention_share(bb, model, loaded, prompts):
    """Share of cross-attention probability that lands on the soft-token positions, per block with tokens
    (UNet: attn2 of the chosen blocks; MM-DiT: the joint attention's text part is not separable here, so
    only for the UNet)."""
    if hooks.is_mmdit(bb.denoiser):
        return None
    shares = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is None:
            return
        q = module.to_q(x)
        k = module.to_k(ctx)
        h = module.heads
        B, N, C = q.shape
        q = q.view(B, N, h, C // h).transpose(1, 2)
        k = k.view(B, ctx.shape[1], h, C // h).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) * (C // h) ** -0.5).softmax(-1)  # (B, h, N, L)
        m = loaded.sets[0].tokens.shape[1]
        shares.append(
            dict(
                tokens=float(a[..., 1 : 1 + m].sum(-1).mean()),
                bos=float(a[..., 0].mean()),
                words=float(a[..., 1 + m :].sum(-1).mean()),
                length=ctx.shape[1],
            )
        )

    chosen = hooks.unet_blocks(bb.denoiser, bb.facts["token_blocks"])
    hs = []
    for block in chosen:
        for name, mod in block.named_modules():
            if name.endswith("attn2"):
                hs.append(mod.register_forward_hook(hook, with_kwargs=True))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(prompts),) + models.latent_shape(bb), generator=g)
    cond = models.encode_prompts(bb, prompts)
    t = torch.full((len(prompts),), 500.0)
    with trained.attached(bb, loaded) as handle, handle.rows(None):
        models.denoise(bb, x, t, cond)
    for h in hs:
        h.remove()
    return shares


@torch.no_grad()
def output_change(bb, loaded, prompts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(prompts),) + models.latent_shape(bb), generator=g)
    cond = models.encode_prompts(bb, prompts)
    out = {}
    for tval in (100.0, 500.0, 900.0):
        t = torch.full((len(prompts),), tval)
        plain = models.denoise(bb, x, t, cond).float()
        with trained.attached(bb, loaded) as handle, handle.rows(None):
            tok = models.denoise(bb, x, t, cond).float()
        out[int(tval)] = float((tok - plain).norm() / plain.norm())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = ["a red circle and a blue square", "three green triangles", "a white square", "two yellow circles"]
    report = {}
    for model in ("tiny-sd1.5", "tiny-sd3"):
        bb = backbones.load(model)
        r = report[model] = {}
        h = text_scale(bb)
        init = softtokens.make_tokens(bb, "dsm", seed=0)
        r["text_states"] = dict(
            rms_all=rms(h),
            rms_bos=rms(h[:, 0]),
            rms_words=rms(h[:, 1:]),
            norm_bos=float(h[0, 0].norm()),
            norm_word_mean=float(h[0, 1:8].norm(dim=-1).mean()),
            width=h.shape[-1],
            max_abs_bos=float(h[0, 0].abs().max()),
        )
        r["init"] = dict(
            kind=bb.facts["init"],
            rms_tokens=rms(init.tokens),
            norm_token=float(init.tokens[0, 0].norm()),
            rms_time_table=rms(init.time_table) if init.time_table is not None else None,
            shape=list(init.tokens.shape),
            blocks=bb.facts["token_blocks"],
            layers=bb.facts["token_layers"],
        )
        r["grad_at_init"] = grads(bb, model)
        r["output_change_at_init"] = output_change(bb, trained.of_tokens(init.sets), prompts)
        r["attention_at_init"] = attention_share(bb, model, trained.of_tokens(init.sets), prompts)
        r["runs"] = {}
        for folder in sorted(glob.glob(os.path.join(ROOT, f"docs/results/rep-{model}-*-seed*"))):
            name = os.path.basename(folder)
            cfg = json.load(open(os.path.join(folder, "config.json")))
            loaded = trained.read(os.path.join(folder, "tokens.safetensors"), model)
            psi_plus = trained.of_tokens(loaded.sets[:1], loaded.placement)
            r["runs"][name] = dict(
                movement=movement(folder, bb, model),
                output_change=output_change(bb, psi_plus, prompts),
                attention=attention_share(bb, model, psi_plus, prompts),
                lr=cfg["lr"],
                lr_sum=lr_sum(os.path.join(folder, "config.json")),
            )
        print(f"== {model}", flush=True)
        print(json.dumps(r, indent=1), flush=True)
    with open(os.path.join(ROOT, "docs/ladder/sd15-diagnosis.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
