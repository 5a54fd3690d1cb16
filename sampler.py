"""
sampler.py: the sampler -- text-to-image with or without soft tokens (SoftREPA sec. 4.1, AGSM sec. 4.1),
the one every script uses (sample.py's command line, edit.py, eval.py, train.py's validation).

The sampler loops are written out so that every step can be read:
  flow models (SD3, SD3.5, FLUX.1, tiny-sd3): Euler on the probability-flow ODE dx/dsigma = v, sigma from
      1 to 0, with SD3's time shift sigma' = shift sigma / (1 + (shift - 1) sigma) (FLUX-dev: its dynamic one);
  DDPM models (SD1.5, SDXL, tiny-sd1.5): DDIM (eta = 0) on SD's "leading" timestep spacing.
Classifier-free guidance: pred = uncond + cfg (cond - uncond), both branches in one batch. By default
both CFG branches use psi+ (SoftREPA; AGSM sec. 4 and Table 5 (ii)); uncond_set=1 puts psi- on the
unconditional branch (AGSM Table 5 (i)). A latent that is not finite at the end (from a cfg, tokens or a
model that diverged) is an error, never an image.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch

import families
import files
import models

# -----------------------------------------------------------------------------
# The sampler core. edit.py uses the same pieces (predict, flow_sigmas, ddim_levels, ddim_step).


def flow_sigmas(steps, shift=1.0):
    """steps + 1 noise levels from 1 to 0 (FlowMatchEulerDiscreteScheduler with `shift`; FLUX-dev's dynamic
    shift is this with shift = e^mu, families.time_shift)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def ddim_timesteps(steps):
    """SD's "leading" spacing with steps_offset = 1: 981, 961, ..., 1 for 50 steps (descending)."""
    ratio = models.NUM_TRAIN_TIMESTEPS // steps
    return (torch.arange(steps) * ratio + 1).flip(0)


def ddim_levels(bb, steps):
    """(timesteps (steps,), alpha_bar levels (steps + 1,)). Step i takes x from level i to level i + 1
    with the denoiser called at timesteps[i]; the last level is alpha_bar[0] (SD's DDIM scheduler has
    set_alpha_to_one = False), so DDIM's final x is its clean-image estimate at t = 0."""
    abar = bb.alphas_cumprod.cpu()
    timesteps = ddim_timesteps(steps)
    return timesteps, torch.cat([abar[timesteps], abar[:1]])


def ddim_step(x, eps, abar_from, abar_to):
    """DDIM (eta = 0) from noise level abar_from to abar_to. Run with abar_to < abar_from it samples;
    with abar_to > abar_from it is DDIM inversion (edit.py). Both use the same two lines:
        x0  = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from)     the clean image eps implies
        x'  = sqrt(abar_to) x0 + sqrt(1 - abar_to) eps             re-noised to the new level"""
    x0 = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


def _rows(token_set, n):
    """A token-set choice for n rows: an int (every row) or a (n,) LongTensor; -1 = no tokens."""
    if torch.is_tensor(token_set):
        return token_set.long()
    return torch.full((n,), int(token_set), dtype=torch.long)


def predict(bb, x, timestep, cond, uncond, cfg, handle=None, uncond_set=None, cond_set=0):
    """One guided prediction. x (B, ...), cond / uncond: text kwargs with B rows each. With cfg == 1 the
    unconditional branch is skipped. With soft tokens attached (`handle`), cond_set is the token set of
    the conditional rows and uncond_set that of the unconditional rows (None: the same as cond_set):
    an int, or one per row as a (B,) LongTensor; -1 = no tokens (edit.py runs a source branch without
    tokens next to a target branch with them). A guidance-distilled family (FLUX-dev) runs one branch
    whatever cfg is: the cfg scale is its guidance input, and there is no unconditional branch."""
    B = x.shape[0]
    t = torch.full((B,), float(timestep), device=x.device)
    cond_rows = _rows(cond_set, B)
    distilled = bb.facts["guidance"] is not None
    if distilled and uncond_set is not None:
        raise SystemExit(
            f"--neg-uncond puts psi- on the unconditional branch, and {bb.name} has none: it is guidance-"
            f"distilled (one branch a step, the cfg scale is its guidance input); sample without it"
        )
    if cfg == 1.0 or distilled:
        choice = None if bool((cond_rows == 0).all()) else cond_rows
        with handle.rows(choice) if handle is not None else nullcontext():
            return models.denoise(bb, x, t, cond, guidance=cfg if distilled else None)
    uncond_rows = cond_rows if uncond_set is None else _rows(uncond_set, B)
    choice = torch.cat([uncond_rows, cond_rows])
    if bool((choice == 0).all()):
        choice = None  # every row uses the first set: the hooks' plain path
    both = models.cat_conds([uncond, cond])
    with handle.rows(choice) if handle is not None else nullcontext():
        pred_uncond, pred_cond = models.denoise(bb, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return pred_uncond + cfg * (pred_cond - pred_uncond)


def initial_noise(shape, seeds):
    """x_T for each seed, drawn on the CPU so that a seed gives the same image on every device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_loop(bb, x, cond, uncond, steps, cfg, handle=None, uncond_set=None, progress=False):
    """The sampler proper: from noise x at the highest noise level to clean latents."""
    facts = bb.facts
    loop = range(steps)
    if progress:
        from tqdm import tqdm

        loop = tqdm(loop, desc="sampling", leave=False)
    if facts["prediction"] == "flow":
        sigmas = flow_sigmas(steps, families.time_shift(facts, *x.shape[-2:]))  # SD3: 3; FLUX-dev: by size
        for i in loop:
            v = predict(bb, x, sigmas[i] * models.NUM_TRAIN_TIMESTEPS, cond, uncond, cfg, handle, uncond_set)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler step from sigma_i to sigma_i+1
    else:
        timesteps, levels = ddim_levels(bb, steps)
        for i in loop:
            eps = predict(bb, x, int(timesteps[i]), cond, uncond, cfg, handle, uncond_set)
            x = ddim_step(x, eps, levels[i], levels[i + 1])
    return x


@torch.no_grad()
def generate(bb, prompts, seeds, steps=None, cfg=None, size=None, handle=None, uncond_set=None, progress=False):
    """Images (B, 3, H, W) in [-1, 1] for `prompts`, one seed each (same seed -> same image)."""
    facts = bb.facts
    steps = steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if cfg is None else cfg
    x = initial_noise(models.latent_shape(bb, size), seeds).to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, list(prompts))
    uncond = models.encode_prompts(bb, [""] * len(prompts)) if facts["guidance"] is None else None  # distilled: none
    x = sample_loop(bb, x, cond, uncond, steps, cfg, handle, uncond_set, progress)
    files.check_finite(x, f"sampling {prompts[0]!r}")  # NaN or inf: one line, no image
    return models.decode_latents(bb, x).float().cpu()


# -----------------------------------------------------------------------------
# What the sampler draws, as files: one PNG per image, and a grid to look at.


def to_uint8(image):
    """A tensor or array (3, H, W) in [-1, 1], or an image already uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image
    if image.ndim == 3 and image.shape[0] == 3:
        return np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    raise TypeError(f"expected uint8 (H,W,3) or float (3,H,W) in [-1,1], got {image.dtype} {image.shape}")


def save_image(image, path):
    from PIL import Image

    files.save_image(Image.fromarray(to_uint8(image)), path)


def save_grid(images, path, per_cell=1, columns=None, min_side=96, row_labels=None, image_labels=None):
    """A grid of images (N, 3, H, W); `per_cell` consecutive images sit side by side in one cell (the
    plain | tokens pair of --compare). Small images are enlarged (nearest) to be seen. row_labels: a
    line of text above each grid row (its prompt); image_labels: one under each image (what it is)."""
    from PIL import Image, ImageDraw

    n_cells = math.ceil(len(images) / per_cell)
    columns = columns or math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / columns)
    _, _, h, w = images.shape
    gap = 2
    cell_w = per_cell * w + (per_cell - 1) * (gap // 2)
    canvas = np.full((rows * (h + gap) - gap, columns * (cell_w + gap) - gap, 3), 255, np.uint8)
    corners = []
    for k, image in enumerate(images):
        cell, within = divmod(k, per_cell)
        r, c = divmod(cell, columns)
        y, x = r * (h + gap), c * (cell_w + gap) + within * (w + gap // 2)
        canvas[y : y + h, x : x + w] = to_uint8(image)
        corners.append((r, x))
    scale = max(1, math.ceil(min_side / h))
    grid = Image.fromarray(canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if row_labels or image_labels:  # each grid row becomes: its label, the images, their labels
        line, above, below = 12, 12 * bool(row_labels), 12 * bool(image_labels)
        step = (h + gap) * scale + above + below
        labelled = Image.new("RGB", (grid.width, rows * step), "white")
        draw = ImageDraw.Draw(labelled)
        for r in range(rows):
            strip = grid.crop((0, r * (h + gap) * scale, grid.width, (r * (h + gap) + h) * scale))
            labelled.paste(strip, (0, r * step + above))
            if row_labels:
                draw.text((2, r * step), row_labels[r], fill="black")
        for k, (r, x) in enumerate(corners if image_labels else []):
            draw.text(
                (x * scale + 2, r * step + above + h * scale + (below - line) // 2), image_labels[k], fill="black"
            )
        grid = labelled
    files.save_image(grid, path)
