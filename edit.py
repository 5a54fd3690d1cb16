"""
edit.py: text-guided image editing, with or without soft tokens on the target branch
(SoftREPA sec. 4.2 and Table 2; AGSM sec. 4.3, Table 2 and appendix F for the settings).

The soft tokens act where the target prompt is read: the target branch of each editor gets psi+
(the same file as sample.py, `--tokens`), the source branch stays the plain model unless
`--tokens-source`. The editors, written out below, with the equations each implements:

  flow backbones (SD3, tiny-sd3), sigma from 1 (noise) to 0 (image), x_sigma = (1 - sigma) x0 + sigma eps:
    flowedit      FlowEdit (Kulikov et al. 2024, Alg. 1): inversion-free. For the last n_max of T steps
                  x_src_t = (1 - t) x_src + t n,  x_tar_t = z + x_src_t - x_src,
                  V_delta = v(x_tar_t, c_tar) - v(x_src_t, c_src)  (mean over n_avg draws of n),
                  z <- z + (t_{i+1} - t_i) V_delta.   T = 50, n_max = 33, CFG 3.5 (source) / 13.5 (target).
    flowalign     FlowAlign (Kim et al. 2025): FlowEdit's paths q_t (source) and p_t (target), the target
                  velocity guided away from the *source* prompt, and a source-consistency term that pulls
                  the two paths' clean-image estimates x0 = x_t - t v together:
                  z <- z + (t_{i+1} - t_i)(v_p - v_q) + zeta ((q_t - t v_q) - (p_t - t v_p)),  zeta = 0.01.
    rf-inversion  RF-Inversion (Rout et al. 2024): controlled forward ODE (image -> noise, null prompt)
                  dY/dt = u(Y) + gamma ((y1 - Y) / (1 - t) - u(Y)),  gamma = 0.5,
                  then the controlled reverse ODE (noise -> image, target prompt, CFG 13.5)
                  dX/dt = v(X) + eta ((X - y0) / t - v(X)),  eta = 0.9 for the first tau = 25% of the steps.

  DDPM UNets (SD1.5, SDXL, tiny-sd1.5), 50 DDIM steps, CFG 7 (AGSM app. F):
    ddim          DDIM inversion of the source image with the source prompt (CFG 1), then DDIM sampling from
                  the inverted noise: a source branch (source prompt) and a target branch (target prompt).
    direct        the same with Direct Inversion (Ju et al. 2024, "PnP-Inversion"): after every step the
                  source branch gets back the difference between the recorded inversion latent and itself,
                  so it stays on the inversion trajectory whatever the CFG. (It corrects the source branch
                  only; the target branch sees the source only through attention control, below.)
    <inv>+masactrl   MasaCtrl (Cao et al. 2023): from step S = 4 and self-attention layer L = 10 on, the
                  target branch's self-attention reads the source branch's keys and values:
                  Attn(Q_tgt, K_src, V_src).
    <inv>+pnp     Plug-and-Play (Tumanyan et al. 2023): for the first tau_A = 25 steps the target branch's
                  decoder self-attention uses the source branch's queries and keys (its attention maps),
                  softmax(Q_src K_src^T / sqrt(d)) V_tgt, and for the first tau_f = 40 steps the output of
                  the decoder's residual block (up_blocks[1].resnets[1]) is the source branch's.
  Step counts are those of 50-step schedules, scaled to --steps. Layer indices count SD1.5's 16
  self-attention layers in forward order (down, mid, up); other UNets get the same relative position,
  index * n / 16 rounded, clamped to their n layers (the tiny UNet has n = 7: MasaCtrl's layer 10 and
  PnP's layer 8 both map to layer 4, the second decoder self-attention of its 4).

The attention control uses diffusers attention processors on the UNet's own attn1 modules and a forward
hook on the residual block: no copy of the model; removing them restores the stock model exactly.

    python edit.py --model tiny-sd3 --image in.png --src "a red square" --tgt "a blue square" --method flowedit
    python edit.py --model sd1.5 --image cat.png --src "a cat" --tgt "a dog" --method direct+pnp --tokens t.safetensors

Writes --out/edited.png (no tokens), edited-tokens.png (with --tokens), strip.png (source | edited |
edited-with-tokens) and edit.json; --bench DIR edits a benchmark into --out/plain/ and --out/tokens/.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import benchmarks
import data
import families
import files
import flags
import models
import sampler
import trained
from shapes import backbones, checker

# The editors and their paper settings (AGSM app. F). Step counts and thresholds are for 50 steps.
METHODS = {
    "flowedit": dict(prediction="flow", steps=50, n_max=33, cfg_src=3.5, cfg=13.5, n_avg=1),
    "flowalign": dict(prediction="flow", steps=50, n_max=33, cfg=13.5, zeta=0.01),
    "rf-inversion": dict(prediction="flow", steps=50, gamma=0.5, eta=0.9, start=0.0, stop=0.25, cfg=13.5),
}
for _inversion in ("ddim", "direct"):
    METHODS[_inversion] = dict(prediction="epsilon", steps=50, cfg=7.0, inversion=_inversion, control=None)
    METHODS[f"{_inversion}+masactrl"] = dict(
        prediction="epsilon", steps=50, cfg=7.0, inversion=_inversion, control="masactrl", start_step=4, start_layer=10
    )
    METHODS[f"{_inversion}+pnp"] = dict(
        prediction="epsilon",
        steps=50,
        cfg=7.0,
        inversion=_inversion,
        control="pnp",
        tau_attn=25,
        tau_feat=40,
        attn_layer=8,
        feat_block=1,
        feat_resnet=1,
    )
ALIASES = {"masactrl": "ddim+masactrl", "pnp": "ddim+pnp"}  # the methods as first published
SD15_SELF_ATTENTION_LAYERS = 16  # the count the papers' layer indices refer to


def check_method(name, method):
    """The method's full name; a one-line error for one that does not exist or does not fit the family."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise SystemExit(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    prediction = families.FAMILIES[name]["prediction"]
    if METHODS[method]["prediction"] != prediction:
        fitting = [m for m, p in METHODS.items() if p["prediction"] == prediction]
        raise SystemExit(
            f"{method} does not work on {name} ({'flow' if prediction == 'flow' else 'DDPM'} "
            f"model): use one of {', '.join(fitting)}"
        )
    return method


def of_50(k, steps):
    """A step index or count given for a 50-step schedule, at `steps` steps."""
    return int(round(k * steps / 50))


# -----------------------------------------------------------------------------
# The editing entry point


@torch.no_grad()
def edit(
    bb,
    image,
    src,
    tgt,
    method,
    handle=None,
    tokens_source=False,
    steps=None,
    cfg=None,
    seed=0,
    progress=False,
    return_source=False,
    **settings,
):
    """Edit `image` ((3, H, W) or (B, 3, H, W) in [-1, 1]) from prompt `src` to prompt `tgt` (a string, or
    one per image) with `method` (a key of METHODS); returns the edited image(s), same shape.

    handle: soft tokens attached to bb.denoiser (hooks.attach); they act on the target branch, and on the
    source branch too with tokens_source=True. Pass it whenever tokens are attached: rows are then told
    per row whether to use them (otherwise every row would). steps / cfg / settings override the method's
    paper settings (METHODS). return_source=True (DDIM methods) also returns the source branch's result,
    the source image as rebuilt from its inversion."""
    method = check_method(bb.name, method)
    p = {**METHODS[method], **settings}
    p["steps"] = steps or p["steps"]
    p["cfg"] = p["cfg"] if cfg is None else cfg
    single = image.dim() == 3
    images = image.unsqueeze(0) if single else image
    B = images.shape[0]
    src = [src] * B if isinstance(src, str) else list(src)
    tgt = [tgt] * B if isinstance(tgt, str) else list(tgt)
    x_src = models.encode_images(bb, images, mode=True)  # the posterior mean: deterministic
    c_src, c_tgt = models.encode_prompts(bb, src), models.encode_prompts(bb, tgt)
    uncond = models.encode_prompts(bb, [""] * B)
    src_set = 0 if tokens_source else -1  # token set of the source rows; -1: none
    generator = torch.Generator().manual_seed(seed)
    args = (bb, x_src, c_src, c_tgt, uncond, p, handle, src_set, generator, progress)
    editor = {"flowedit": flowedit, "flowalign": flowalign, "rf-inversion": rf_inversion}.get(method, ddim_edit)
    x, x_source = editor(*args)  # the source branch's result: DDIM methods only
    files.check_finite(x, f"editing to {tgt[0]!r}")  # NaN or inf: one line, no image
    edited = models.decode_latents(bb, x).float().cpu()
    edited = edited[0] if single else edited
    if not return_source:
        return edited
    source = models.decode_latents(bb, x_source).float().cpu() if x_source is not None else None
    return edited, (source[0] if single and source is not None else source)


def _steps(loop, progress, desc):
    return tqdm(loop, desc=desc, leave=False, disable=not progress)


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


# -----------------------------------------------------------------------------
# Flow backbones


def flowedit(bb, x_src, c_src, c_tgt, uncond, p, handle, src_set, generator, progress):
    """FlowEdit, Kulikov et al. 2024, Algorithm 1 (n_min = 0: every one of the last n_max steps edits).
    The edit z moves by the difference of the two velocity fields along coupled paths that share their
    noise: where the prompts agree the difference is zero and z keeps the source's content."""
    sigmas = sampler.flow_sigmas(p["steps"], families.time_shift(bb.facts, *x_src.shape[-2:]))
    first = p["steps"] - of_50(p["n_max"], p["steps"])  # T - n_max: the steps FlowEdit skips
    z = x_src.clone()  # z^FE_{t_max} = x_src
    for i in _steps(range(first, p["steps"]), progress, "flowedit"):
        t, t_next = sigmas[i], sigmas[i + 1]
        timestep = t * models.NUM_TRAIN_TIMESTEPS
        v_delta = torch.zeros_like(z)
        for _ in range(p["n_avg"]):
            n = _noise(x_src, generator)
            x_src_t = (1 - t) * x_src + t * n  # the source image's forward path
            x_tar_t = z + x_src_t - x_src  # shifted by the edit so far
            v_tar = sampler.predict(bb, x_tar_t, timestep, c_tgt, uncond, p["cfg"], handle, cond_set=0)
            v_src = sampler.predict(bb, x_src_t, timestep, c_src, uncond, p["cfg_src"], handle, cond_set=src_set)
            v_delta += (v_tar - v_src) / p["n_avg"]
        z = z + (t_next - t) * v_delta  # Euler step of dz/dt = V_delta
    return z, None


def flowalign(bb, x_src, c_src, c_tgt, uncond, p, handle, src_set, generator, progress):
    """FlowAlign, Kim et al. 2025 (update as in the authors' implementation), on FlowEdit's schedule:
        q_t = (1 - t) x_src + t n                 source path
        p_t = z + q_t - x_src                     target path
        v_p = v(p_t, c_src) + w (v(p_t, c_tgt) - v(p_t, c_src))   guided away from the source prompt
        v_q = v(q_t, c_src)                       no guidance
        z  <- z + (t_{i+1} - t_i)(v_p - v_q) + zeta ((q_t - t v_q) - (p_t - t v_p))
    x_t - t v is the clean image a flow model's velocity implies (x_t = (1 - t) x0 + t eps, v = eps - x0);
    the zeta term is the step of the flow-matching regulariser that keeps the edit's clean estimate near
    the source's along the whole trajectory (FlowAlign's source consistency). The authors' code integrates
    all T steps; AGSM runs it "consistent with the FlowEdit configuration", n_max = 33 (n_max=50: theirs)."""
    sigmas = sampler.flow_sigmas(p["steps"], families.time_shift(bb.facts, *x_src.shape[-2:]))
    first = p["steps"] - of_50(p["n_max"], p["steps"])
    z = x_src.clone()
    for i in _steps(range(first, p["steps"]), progress, "flowalign"):
        t, t_next = sigmas[i], sigmas[i + 1]
        timestep = t * models.NUM_TRAIN_TIMESTEPS
        n = _noise(x_src, generator)
        q_t = (1 - t) * x_src + t * n
        p_t = z + q_t - x_src
        v_p = sampler.predict(bb, p_t, timestep, c_tgt, c_src, p["cfg"], handle, cond_set=0)
        v_q = sampler.predict(bb, q_t, timestep, c_src, None, 1.0, handle, cond_set=src_set)
        z = z + (t_next - t) * (v_p - v_q) + p["zeta"] * ((q_t - t * v_q) - (p_t - t * v_p))
    return z, None


def rf_inversion(bb, x_src, c_src, c_tgt, uncond, p, handle, src_set, generator, progress):
    """RF-Inversion, Rout et al. 2024 (Alg. 1 / 2), written with SD3's sigma (0 image, 1 noise).
    Inversion, sigma 0 -> 1, null prompt: u(Y) is the model's velocity (dY/dsigma = v runs the sampler's
    ODE backwards) and (y1 - Y) / (1 - sigma) the velocity of the straight line from Y to a fixed noise y1:
        Y <- Y + (sigma' - sigma) [u(Y) + gamma ((y1 - Y) / (1 - sigma) - u(Y))]
    (gamma = 1 ends exactly at y1, gamma = 0 is plain ODE inversion). Editing, sigma 1 -> 0, target prompt
    with CFG: (X - y0) / sigma is the velocity of the straight line from X back to the source image y0:
        X <- X + (sigma' - sigma) [v(X) + eta_i ((X - y0) / sigma - v(X))]
    with eta_i = eta for steps start * T <= i < stop * T and 0 after (eta = 1 throughout returns y0)."""
    steps = p["steps"]
    sigmas = sampler.flow_sigmas(steps, families.time_shift(bb.facts, *x_src.shape[-2:]))
    rising = sigmas.flip(0)  # the same levels, image -> noise
    y1 = _noise(x_src, generator)
    Y = x_src.clone()
    for i in _steps(range(steps), progress, "rf-inversion: invert"):
        s, s_next = rising[i], rising[i + 1]
        u = sampler.predict(bb, Y, s * models.NUM_TRAIN_TIMESTEPS, uncond, None, 1.0, handle, cond_set=src_set)
        u_cond = (y1 - Y) / (1 - s)
        Y = Y + (s_next - s) * (u + p["gamma"] * (u_cond - u))
    X = Y
    first, last = int(p["start"] * steps), min(int(p["stop"] * steps), steps)
    for i in _steps(range(steps), progress, "rf-inversion: edit"):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = sampler.predict(bb, X, s * models.NUM_TRAIN_TIMESTEPS, c_tgt, uncond, p["cfg"], handle, cond_set=0)
        eta = p["eta"] if first <= i < last else 0.0
        v_cond = (X - x_src) / s
        X = X + (s_next - s) * (v + eta * (v_cond - v))
    return X, None


# -----------------------------------------------------------------------------
# DDPM UNets: DDIM / Direct Inversion, and the attention control of MasaCtrl and Plug-and-Play


def ddim_invert(bb, x0, cond, steps, handle=None, cond_set=-1, progress=False):
    """DDIM inversion (CFG 1): the latents at every level of the `steps`-step DDIM schedule, x0 last.
    Sampling step i goes from level i to i + 1 with eps(x, timesteps[i]); inversion runs it backwards,
    from level i + 1 to i with eps evaluated at the current (less noisy) x -- the usual approximation
    eps(x_{t-1}, t) ~ eps(x_t, t) that makes DDIM inversion inexact by a little each step."""
    timesteps, levels = sampler.ddim_levels(bb, steps)
    latents = [None] * steps + [x0]
    x = x0
    for i in _steps(range(steps - 1, -1, -1), progress, "DDIM inversion"):
        eps = sampler.predict(bb, x, int(timesteps[i]), cond, None, 1.0, handle, cond_set=cond_set)
        x = sampler.ddim_step(x, eps, levels[i + 1], levels[i])
        latents[i] = x
    return latents


def self_attention_layers(unet):
    """The UNet's self-attention modules (attn1 of each transformer block) in forward order."""
    layers = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            layers += [m for name, m in block.named_modules() if name.endswith("attn1")]
    return layers


def scaled_layer(index, n):
    """An SD1.5 self-attention layer index (of 16) at the same relative depth among n layers."""
    return min(n - 1, max(0, round(index * n / SD15_SELF_ATTENTION_LAYERS)))


def source_rows(n, per_branch):
    """For a batch laid out as sampler.predict lays it out, [src, tgt] (CFG 1) or [src, tgt] uncond then
    [src, tgt] cond, chunks of `per_branch` rows: the row each row takes the source's features from
    (itself for source rows; the matching source row, uncond to uncond and cond to cond, for target rows)."""
    r = torch.arange(n)
    return torch.where((r // per_branch) % 2 == 1, r - per_branch, r)


def controlled_self_attention(stock, state, share, active):
    """An attention processor for a UNet attn1: the stock one while `active(step)` is false; else
    self-attention written out in which the target rows take `share` ("kv": MasaCtrl's keys and values;
    "qk": PnP's queries and keys) from their source rows. (SD's attn1 has no norms or residual inside.)"""

    def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if not active(state["step"]) or encoder_hidden_states is not None:
            return stock(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        follow = source_rows(hidden_states.shape[0], state["per_branch"]).to(hidden_states.device)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if "q" in share:
            q = q[follow]
        if "k" in share:
            k = k[follow]
        if "v" in share:
            v = v[follow]
        B, N, width = q.shape
        q, k, v = (a.view(B, -1, attn.heads, width // attn.heads).transpose(1, 2) for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, per head
        out = out.transpose(1, 2).reshape(B, N, width)
        return attn.to_out[1](attn.to_out[0](out))  # output projection, dropout

    return processor


def attach_control(unet, p, state, steps):
    """Install MasaCtrl's or PnP's control on the UNet; returns a function that takes it off again."""
    layers = self_attention_layers(unet)
    undo = []

    def control_attention(first_layer, share, active):
        for attn in layers[scaled_layer(first_layer, len(layers)) :]:
            stock = attn.processor
            attn.set_processor(controlled_self_attention(stock, state, share, active))
            undo.append(lambda attn=attn, stock=stock: attn.set_processor(stock))

    if p["control"] == "masactrl":
        start = of_50(p["start_step"], steps)
        control_attention(p["start_layer"], "kv", lambda step: step >= start)
    elif p["control"] == "pnp":
        tau_attn, tau_feat = of_50(p["tau_attn"], steps), of_50(p["tau_feat"], steps)
        control_attention(p["attn_layer"], "qk", lambda step: step < tau_attn)
        block = unet.up_blocks[min(p["feat_block"], len(unet.up_blocks) - 1)]
        resnet = block.resnets[min(p["feat_resnet"], len(block.resnets) - 1)]

        def inject_features(module, args, output):  # the residual block's output, h_src -> h_tgt
            if state["step"] < tau_feat:
                return output[source_rows(output.shape[0], state["per_branch"]).to(output.device)]

        undo.append(resnet.register_forward_hook(inject_features).remove)

    def remove():
        for fn in reversed(undo):
            fn()

    return remove


def ddim_edit(bb, x_src, c_src, c_tgt, uncond, p, handle, src_set, generator, progress):
    """DDIM or Direct Inversion, then the source and target branches sampled together in one batch (so
    that the attention control can hand the source's features to the target). Returns (target, source)."""
    steps, B = p["steps"], x_src.shape[0]
    inverted = ddim_invert(bb, x_src, c_src, steps, handle, src_set, progress)
    timesteps, levels = sampler.ddim_levels(bb, steps)
    cond, unconds = models.cat_conds([c_src, c_tgt]), models.cat_conds([uncond, uncond])
    rows = torch.cat([torch.full((B,), src_set), torch.zeros(B, dtype=torch.long)])  # tokens: target rows
    state = dict(step=0, per_branch=B)
    remove = attach_control(bb.denoiser, p, state, steps) if p["control"] else (lambda: None)
    x_source, x_target = inverted[0], inverted[0]
    try:
        for i in _steps(range(steps), progress, p["inversion"] + ("+" + p["control"] if p["control"] else "")):
            state["step"] = i
            x = torch.cat([x_source, x_target])
            eps = sampler.predict(bb, x, int(timesteps[i]), cond, unconds, p["cfg"], handle, cond_set=rows)
            x_source, x_target = sampler.ddim_step(x, eps, levels[i], levels[i + 1]).chunk(2)
            if p["inversion"] == "direct":
                # PnP-Inversion: add the gap between the inversion latent and the source branch back to
                # the source branch (it is then on the inversion trajectory again, exactly)
                x_source = x_source + (inverted[i + 1] - x_source)
    finally:
        remove()
    return x_target, x_source


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_backbone_flags(p)
    p.add_argument("--image", default=None, help="the source image (any format PIL reads)")
    p.add_argument("--src", default=None, help="the source prompt (describes --image)")
    p.add_argument("--tgt", default=None, help="the target prompt (the edit)")
    p.add_argument(
        "--shapes-check",
        type=flags.NON_NEGATIVE_INT,
        default=0,
        metavar="N",
        help="tiny-*: N rendered objects with a "
        "colour or shape change, every method, success by the checker (with and without --tokens); 0: none",
    )
    p.add_argument(
        "--method",
        default=None,
        help=f"one of {', '.join(METHODS)}; masactrl, pnp: their ddim+ "
        f"forms (default: flowedit for flow models, direct+pnp for UNets)",
    )
    p.add_argument("--tokens", default=None, help="soft tokens for the target branch (as sample.py --tokens)")
    p.add_argument("--tokens-source", action="store_true", help="also put the tokens on the source branch")
    p.add_argument("--ema", action="store_true", help="pair-token files: the EMA psi+")
    p.add_argument("--steps", type=flags.integer_in(2), default=None, help="at least 2 (default: the method's, 50)")
    p.add_argument(
        "--cfg",
        type=flags.NON_NEGATIVE_FLOAT,
        default=None,
        help="target CFG (default: the method's; 1: none, 0: unconditional)",
    )
    p.add_argument(
        "--size",
        type=flags.POSITIVE_INT,
        default=None,
        help="the image is resized (shorter side) and centre-"
        "cropped to this side, as diffusers pipelines prepare an input (default: the family's)",
    )
    p.add_argument(
        "--bench", default=None, help="edit a whole benchmark folder (PIE-Bench, DIV2K, Cat2Dog: benchmarks.py)"
    )
    p.add_argument("--limit", type=flags.NON_NEGATIVE_INT, default=0, help="--bench: its first N edits (0: all)")
    p.add_argument("--seed", type=flags.SEED, default=0, help="a seed in [0, 2^63)")
    p.add_argument("--out", default="out/edit")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def shapes_check(bb, n, loaded, seed=0):
    """How many of n shapes edits each method gets right (the target's colour-shape binding present),
    without and with the soft tokens on the target branch."""
    images, sources, targets, specs = checker.shapes_edit_cases(n, seed)
    methods = [m for m, settings in METHODS.items() if settings["prediction"] == bb.facts["prediction"]]
    results = {}
    for method in methods:
        row = {}
        for label in ("plain", "tokens") if loaded is not None else ("plain",):
            with trained.attached(bb, loaded if label == "tokens" else None) as handle:
                edited = edit(bb, images, sources, targets, method, handle, seed=seed)
            row[label] = sum(checker.check(e, s) for e, s in zip(edited, specs))
        results[method] = row
        print(f"{method:18s} " + "  ".join(f"{k} {v}/{n}" for k, v in row.items()), flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    models.check_backbone_flags(args)
    facts, tiny = families.FAMILIES[args.model], models.is_shapes_world(args.model)
    if args.shapes_check:
        if not tiny:
            raise SystemExit("--shapes-check edits shapes-world images: use it with tiny-sd3 or tiny-sd1.5")
        loaded = trained.read(args.tokens, args.model, ema=args.ema)
        bb = models.from_flags(args, shapes_world=backbones.load)
        return shapes_check(bb, args.shapes_check, loaded, args.seed)
    if args.bench is None and (args.image is None or args.src is None or args.tgt is None):
        raise SystemExit(
            "edit.py needs --image, --src and --tgt, or --bench DIR (or --shapes-check N on a tiny model)"
        )
    method = check_method(args.model, args.method or ("flowedit" if facts["prediction"] == "flow" else "direct+pnp"))
    # one record per edit: the benchmark's (benchmarks.py: PIE-Bench, DIV2K with captions, Cat2Dog), or --image's
    records = (
        benchmarks.read(args.bench)[: args.limit or None]
        if args.bench
        else [dict(name=None, image=args.image, src=args.src, tgt=args.tgt)]
    )
    backbones.check_prompts(args.model, [r[k] for r in records for k in ("src", "tgt")])
    size = args.size or facts["size"]
    families.check_size(args.model, size)
    if args.tokens_source and args.tokens is None:
        raise SystemExit("--tokens-source puts the --tokens on the source branch too: pass --tokens FILE")
    # the tokens (or LoRA) file and the first image, read and checked before the model loads
    loaded = trained.read(args.tokens, args.model, ema=args.ema)
    first = data.to_tensor(
        data.read_image(records[0]["image"], size)
    )  # resized and centre-cropped to the model's size
    files.check_writable(args.out)  # before the work: a read-only --out must not lose the edit

    bb = models.from_flags(args, shapes_world=backbones.load)
    families.check_size(args.model, size, bb=bb)  # the loaded model's positional table
    run = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, progress=args.bench is None)
    for i, record in enumerate(tqdm(records, desc=method, disable=args.bench is None)):
        image = first if i == 0 else data.to_tensor(data.read_image(record["image"], size))
        edited = [edit(bb, image, record["src"], record["tgt"], method, **run)]
        if loaded is not None:
            with trained.attached(bb, loaded) as handle:
                edited.append(edit(bb, image, record["src"], record["tgt"], method, handle, args.tokens_source, **run))
        if args.bench:  # --bench: <out>/plain/<name> and <out>/tokens/<name>, the folders eval.py --bench reads
            for variant, picture in zip(("plain", "tokens"), edited):
                os.makedirs(os.path.dirname(path := os.path.join(args.out, variant, record["name"])), exist_ok=True)
                sampler.save_image(picture, os.path.splitext(path)[0] + ".png")
    if not args.bench:
        for name, picture in zip(("edited.png", "edited-tokens.png"), edited):
            sampler.save_image(picture, os.path.join(args.out, name))
        sampler.save_grid(
            torch.stack([image] + edited), os.path.join(args.out, "strip.png"), per_cell=1 + len(edited), columns=1
        )
    settings = {**METHODS[method], **{k: v for k, v in (("steps", args.steps), ("cfg", args.cfg)) if v is not None}}
    record = dict(
        model=args.model,
        image=args.image,
        src=args.src,
        tgt=args.tgt,
        bench=args.bench,
        edits=len(records),
        method=method,
        tokens=args.tokens,
        token_set=loaded and loaded.token_set,
        tokens_source=args.tokens_source,
        seed=args.seed,
        size=list(image.shape[1:]),
        settings=settings,
    )
    files.write_json(os.path.join(args.out, "edit.json"), record)
    print(
        f"{method}: "
        + (
            f"{len(records)} edits in {args.out}/plain" + (" and tokens" if loaded else "")
            if args.bench
            else f"strip.png (source | edited{' | edited with tokens' if loaded else ''}) in {args.out}"
        )
    )
    return record


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
