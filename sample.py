"""
sample.py: text-to-image sampling, with or without soft tokens.

The sampler loops are written out so that every step can be read:
  flow models (SD3, tiny-sd3): Euler on the probability-flow ODE dx/dsigma = v, sigma from 1 to 0,
      with SD3's time shift sigma' = shift sigma / (1 + (shift - 1) sigma);
  DDPM models (SD1.5, SDXL, tiny-sd1.5): DDIM (eta = 0) on SD's "leading" timestep spacing.
Classifier-free guidance: pred = uncond + cfg (cond - uncond), both branches in one batch. By
default both branches use psi+ (SoftREPA; AGSM sec. 4 and Table 5 (ii)); `--neg-uncond` puts psi-
on the unconditional branch (AGSM Table 5 (i)).
"""
import torch

import models


def flow_sigmas(steps, shift=1.0):
    """steps + 1 noise levels from 1 to 0 (SD3 FlowMatchEulerDiscreteScheduler with `shift`)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def ddim_timesteps(steps):
    """SD's "leading" spacing with steps_offset = 1: 981, 961, ..., 1 for 50 steps (descending)."""
    ratio = models.NUM_TRAIN_TIMESTEPS // steps
    return (torch.arange(steps) * ratio + 1).flip(0)


def predict(bb, x, timestep, cond, uncond, cfg, handle=None, uncond_set=None):
    """One guided prediction. x (B, ...), cond / uncond: text kwargs with B rows each. With cfg == 1 the
    unconditional branch is skipped. uncond_set: the token set index for the unconditional rows."""
    B = x.shape[0]
    t = torch.full((B,), float(timestep), device=x.device)
    if cfg == 1.0:
        return models.denoise(bb, x, t, cond)
    both = models.cat_conds([uncond, cond])
    choice = None
    if handle is not None and uncond_set is not None:
        choice = torch.cat([torch.full((B,), uncond_set), torch.zeros(B, dtype=torch.long)])
    if handle is not None:
        with handle.rows(choice):
            pred_uncond, pred_cond = models.denoise(bb, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    else:
        pred_uncond, pred_cond = models.denoise(bb, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return pred_uncond + cfg * (pred_cond - pred_uncond)


@torch.no_grad()
def generate(bb, prompts, seeds, steps=None, cfg=None, size=None, handle=None, uncond_set=None,
             progress=False):
    """Images (B, 3, H, W) in [-1, 1] for `prompts`, one seed each (same seed -> same image)."""
    facts = bb.facts
    steps = steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if cfg is None else cfg
    shape = models.latent_shape(bb, size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = noise.to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, list(prompts))
    uncond = models.encode_prompts(bb, [""] * len(prompts))
    loop = range(steps)
    if progress:
        from tqdm import tqdm
        loop = tqdm(loop, desc="sampling", leave=False)
    if facts["prediction"] == "flow":
        sigmas = flow_sigmas(steps, facts["flow_shift"] or 1.0)
        for i in loop:
            v = predict(bb, x, sigmas[i] * models.NUM_TRAIN_TIMESTEPS, cond, uncond, cfg, handle, uncond_set)
            x = x + (sigmas[i + 1] - sigmas[i]) * v                   # Euler step from sigma_i to sigma_i+1
    else:
        abar = bb.alphas_cumprod.cpu()
        timesteps = ddim_timesteps(steps)
        for i in loop:
            t = int(timesteps[i])
            abar_prev = abar[int(timesteps[i + 1])] if i + 1 < steps else abar[0]
            eps = predict(bb, x, t, cond, uncond, cfg, handle, uncond_set)
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()    # the clean image eps implies
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps  # DDIM, eta = 0
    return models.decode_latents(bb, x).float().cpu()
