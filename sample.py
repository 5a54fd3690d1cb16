"""
sample.py: text-to-image sampling, with or without soft tokens (SoftREPA sec. 4.1, AGSM sec. 4.1).

The sampler loops are written out so that every step can be read:
  flow models (SD3, tiny-sd3): Euler on the probability-flow ODE dx/dsigma = v, sigma from 1 to 0,
      with SD3's time shift sigma' = shift sigma / (1 + (shift - 1) sigma);
  DDPM models (SD1.5, SDXL, tiny-sd1.5): DDIM (eta = 0) on SD's "leading" timestep spacing.
Classifier-free guidance: pred = uncond + cfg (cond - uncond), both branches in one batch. By
default both branches use psi+ (SoftREPA; AGSM sec. 4 and Table 5 (ii)); `--neg-uncond` puts psi-
on the unconditional branch (AGSM Table 5 (i)).

    python sample.py --model tiny-sd3 --prompt "a red circle above a blue square" --seed 0 1 2 3
    python sample.py --model tiny-sd3 --prompts data/shapes_eval.jsonl --tokens runs/x/tokens.safetensors --out out/x
    python sample.py --model sd3 --tokens ../shared/official-softrepa-tokens/sd3 --prompt "..." --compare
    python sample.py --model sd3 --random-init --bench --size 128 --steps 1 --cfg 1   # latency / memory overhead

What it writes in --out: images/NNNNN.png (one per prompt and seed; with --compare also the plain
image of each), grid.png, and records.jsonl, one line per image, which eval.py reads:
    {"image": "images/00000.png", "prompt": ..., "seed": 0, "variant": "tokens" | "plain",
     "model": ..., "tokens": path | null, "token_set": "pos" | "ema_pos" | "tokens" | "softrepa" | null,
     "uncond": "psi+" | "psi-" | "none", "steps": ..., "cfg": ..., "size": ..., "spec": {...} (if given)}
"""
import argparse
import json
import math
import os
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

import data
import hooks
import models
import shapes
import softtokens


# -----------------------------------------------------------------------------
# The sampler core. edit.py uses the same pieces (predict, flow_sigmas, ddim_levels, ddim_step).

def flow_sigmas(steps, shift=1.0):
    """steps + 1 noise levels from 1 to 0 (SD3 FlowMatchEulerDiscreteScheduler with `shift`)."""
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
    tokens next to a target branch with them)."""
    B = x.shape[0]
    t = torch.full((B,), float(timestep), device=x.device)
    cond_rows = _rows(cond_set, B)
    if cfg == 1.0:
        choice = None if bool((cond_rows == 0).all()) else cond_rows
        with handle.rows(choice) if handle is not None else nullcontext():
            return models.denoise(bb, x, t, cond)
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
        sigmas = flow_sigmas(steps, facts["flow_shift"] or 1.0)
        for i in loop:
            v = predict(bb, x, sigmas[i] * models.NUM_TRAIN_TIMESTEPS, cond, uncond, cfg, handle, uncond_set)
            x = x + (sigmas[i + 1] - sigmas[i]) * v                   # Euler step from sigma_i to sigma_i+1
    else:
        timesteps, levels = ddim_levels(bb, steps)
        for i in loop:
            eps = predict(bb, x, int(timesteps[i]), cond, uncond, cfg, handle, uncond_set)
            x = ddim_step(x, eps, levels[i], levels[i + 1])
    return x


@torch.no_grad()
def generate(bb, prompts, seeds, steps=None, cfg=None, size=None, handle=None, uncond_set=None,
             progress=False):
    """Images (B, 3, H, W) in [-1, 1] for `prompts`, one seed each (same seed -> same image)."""
    facts = bb.facts
    steps = steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if cfg is None else cfg
    x = initial_noise(models.latent_shape(bb, size), seeds).to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, list(prompts))
    uncond = models.encode_prompts(bb, [""] * len(prompts))
    x = sample_loop(bb, x, cond, uncond, steps, cfg, handle, uncond_set, progress)
    return models.decode_latents(bb, x).float().cpu()


# -----------------------------------------------------------------------------
# Image sizes a backbone takes, known before it is loaded: models.FAMILIES' size_multiple / max_size.

def check_size(name, height, width=None, what="size"):
    """One-line error for an image size the backbone cannot take."""
    multiple, largest = models.FAMILIES[name]["size_multiple"], models.FAMILIES[name]["max_size"]
    for side in (height, width if width is not None else height):
        if side < multiple or side % multiple or (largest and side > largest):
            limit = f" up to {largest}" if largest else ""
            raise SystemExit(f"{what} {height}x{width or height} does not fit {name}: it takes sides that are "
                             f"multiples of {multiple}{limit}; pass --size with such a value")


# -----------------------------------------------------------------------------
# Soft-token files

def read_tokens(path, name, ema=False, neg_uncond=False):
    """The token sets to attach from `path`, and a description of them for the records.

    path: a file written by softtokens.save (a SoftTokens, or AGSM's PairTokens, of which we sample
    with psi+ -- its EMA copy with ema=True -- and put psi- on the unconditional branch with
    neg_uncond=True), or a folder of the SoftREPA authors' released .pth files. Returns
    (sets, info): attach `sets` with hooks.attach; set 0 is the one for the conditional branch and,
    for neg_uncond, set 1 is psi-."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "dc_tokens.pth")):
            raise SystemExit(f"{path} is a folder without dc_tokens.pth: pass a token file written by "
                             f"train.py or a folder of the released SoftREPA tokens")
        if ema or neg_uncond:
            raise SystemExit("--ema and --neg-uncond need an AGSM pair-token file (psi+ and psi-); "
                             f"{path} holds the released SoftREPA tokens (one set)")
        family = name.removeprefix("tiny-")
        return [softtokens.import_softrepa(path, family)], dict(token_set="softrepa", blocks=None)
    if not os.path.exists(path):
        raise SystemExit(f"no token file at {path}")
    from safetensors import SafetensorError
    try:
        tokens, meta = softtokens.load(path)
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # not a token file of ours
        raise SystemExit(f"cannot read {path} as a soft-token file ({type(e).__name__}): pass a file written "
                         f"by softtokens.save") from None
    if meta.get("model") not in (None, name):
        raise SystemExit(f"{path} holds tokens for {meta['model']}, not {name}: pass --model {meta['model']}")
    blocks = meta.get("blocks")
    if isinstance(tokens, softtokens.SoftTokens):
        if ema or neg_uncond:
            raise SystemExit(f"--ema and --neg-uncond need an AGSM pair-token file (psi+ and psi-); "
                             f"{path} holds one set")
        return [tokens], dict(token_set="tokens", blocks=blocks)
    if ema:
        return [tokens.ema_pos, tokens.ema_neg], dict(token_set="ema_pos", blocks=blocks)
    return [tokens.pos, tokens.neg], dict(token_set="pos", blocks=blocks)


def attach_tokens(bb, sets, blocks=None):
    """hooks.attach with the family's blocks, on the backbone's device; a one-line error on a misfit."""
    sets = [s.to(bb.device) for s in sets]
    try:
        return hooks.attach(bb.denoiser, sets, blocks=tuple(blocks or bb.facts["token_blocks"] or ()) or None)
    except ValueError as e:
        raise SystemExit(f"cannot attach these tokens to {bb.name}: {e}") from None


# -----------------------------------------------------------------------------
# Prompts and images

def read_prompts(path):
    """[{"prompt": ..., "spec": ... (if any)}] from a text file (one prompt a line) or JSONL."""
    if not os.path.exists(path):
        raise SystemExit(f"no prompts file at {path}")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"{path} has no prompts")
    if not lines[0].startswith("{"):
        return [{"prompt": line} for line in lines]
    items = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path} line {n} is not JSON ({e.msg}): write one JSON object a line") from None
        if not isinstance(item.get("prompt"), str):
            raise SystemExit(f"{path} line {n} has no \"prompt\" string")
        items.append({k: item[k] for k in ("prompt", "spec") if k in item})
    return items


def check_prompts(name, prompts):
    """The tiny models read only the shapes world's words (shapes.VOCAB), at most shapes.MAX_LEN tokens."""
    if not name.startswith("tiny-"):
        return
    for prompt in prompts:
        problem = shapes.language_problem(prompt)
        if problem:
            raise SystemExit(f"prompt {prompt!r} is not in the shapes world's language ({problem})")


def save_image(image, path):
    from PIL import Image
    Image.fromarray(shapes.to_uint8(image)).save(path)


def save_grid(images, path, per_cell=1, columns=None, min_side=96):
    """A grid of images (N, 3, H, W); `per_cell` consecutive images sit side by side in one cell (the
    plain | tokens pair of --compare). Small images are enlarged (nearest) to be seen."""
    from PIL import Image
    n_cells = math.ceil(len(images) / per_cell)
    columns = columns or math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / columns)
    _, _, h, w = images.shape
    gap = 2
    cell_w = per_cell * w + (per_cell - 1) * (gap // 2)
    canvas = np.full((rows * (h + gap) - gap, columns * (cell_w + gap) - gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        cell, within = divmod(k, per_cell)
        r, c = divmod(cell, columns)
        y, x = r * (h + gap), c * (cell_w + gap) + within * (w + gap // 2)
        canvas[y:y + h, x:x + w] = shapes.to_uint8(image)
    scale = max(1, math.ceil(min_side / h))
    grid = Image.fromarray(canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)


# -----------------------------------------------------------------------------
# Efficiency (SoftREPA Table 1: latency and peak memory with and without soft tokens).

SD3_TEXT_TOKENS = 77 + 256  # SD3's text stream: 77 CLIP + 256 T5 tokens of width 4096


def random_real_backbone(name, seed=0):
    """SD3's transformer at full size with random weights (models.REAL_DENOISER_CONFIGS), for --bench."""
    if name != "sd3":
        raise SystemExit("--random-init builds the tiny models, and SD3's real-size transformer for --bench")
    return models.real_size_backbone(name, seed)


def random_text(bb, batch, seed=0):
    """Text kwargs of the real shapes with random values, for a backbone that has no text encoder."""
    g = torch.Generator().manual_seed(seed)
    config = bb.denoiser.config
    cond = {"encoder_hidden_states": torch.randn(batch, SD3_TEXT_TOKENS, config.joint_attention_dim, generator=g)}
    cond["pooled_projections"] = torch.randn(batch, config.pooled_projection_dim, generator=g)
    return {k: v.to(bb.device, bb.dtype) for k, v in cond.items()}


def peak_memory(run):
    """Peak memory in bytes allocated by `run()` above what was allocated before it: the CUDA
    allocator's peak on a GPU; on the CPU the running sum of the profiler's allocation events."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()   # + allocation, - free
        peak = max(peak, current)
    return peak


def bench(bb, sets, steps, cfg, size, batch=1, repeats=5, blocks=None, cond=None, uncond=None, progress=True):
    """Latency and peak memory of `steps` guided sampler steps on `batch` images, with and without the
    soft tokens `sets` attached (psi+ on both CFG branches, the default). Plain and tokens runs
    alternate, so a slow spell of a shared machine hits both; times are medians over `repeats`, in
    seconds per image, and the overhead is the median of the paired ratios. Returns a dict of numbers."""
    if cond is None:
        cond = models.encode_prompts(bb, ["a red circle above a blue square"] * batch)
        uncond = models.encode_prompts(bb, [""] * batch)
    shape = models.latent_shape(bb, size)
    x = initial_noise(shape, range(batch)).to(bb.device, bb.dtype)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)

    def run(handle):
        sample_loop(bb, x, cond, uncond, steps, cfg, handle)
        sync()

    def with_variant(variant, fn):
        handle = attach_tokens(bb, sets, blocks) if variant == "tokens" else None
        try:
            return fn(handle)
        finally:
            if handle is not None:
                handle.remove()

    # Wall-clock time, and on the CPU also the process's CPU time: on a shared machine the wall clock
    # counts the time other processes held the cores, the CPU time only this process's own work.
    times = {(v, clock): [] for v in ("plain", "tokens") for clock in ("wall", "cpu")}
    for variant in ("plain", "tokens"):       # warm-up (first calls allocate and pick kernels)
        with_variant(variant, run)
    loop = range(repeats)
    if progress:
        from tqdm import tqdm
        loop = tqdm(loop, desc="bench", leave=False)
    for r in loop:
        for variant in (("plain", "tokens") if r % 2 == 0 else ("tokens", "plain")):
            def timed(handle):
                wall, cpu = time.perf_counter(), time.process_time()
                run(handle)
                return time.perf_counter() - wall, time.process_time() - cpu
            wall, cpu = with_variant(variant, timed)
            times[variant, "wall"].append(wall / batch)
            times[variant, "cpu"].append(cpu / batch)
    # peak memory = the weights (+ the tokens' own parameters) + the activations' peak above them
    activations = {v: with_variant(v, lambda h: peak_memory(lambda: run(h))) for v in ("plain", "tokens")}
    weights = sum(p.numel() * p.element_size() for p in bb.denoiser.parameters())
    token_bytes = sum(p.numel() * p.element_size() for p in sets[0].parameters())
    memory = {"plain": weights + activations["plain"], "tokens": weights + token_bytes + activations["tokens"]}
    clocks = ["wall", "cpu"] if bb.device.type == "cpu" else ["wall"]
    result = dict(model=bb.name, size=size, steps=steps, batch=batch, cfg=cfg, repeats=repeats,
                  device=str(bb.device), dtype=str(bb.dtype).removeprefix("torch."), token_shape=list(sets[0].shape))
    for clock in clocks:
        # the overhead from paired runs (adjacent in time, so a slow spell hits both): the median of the
        # per-repeat ratios, with half their interquartile range as its uncertainty; also in ms per sampler step
        plain, tokens = times["plain", clock], times["tokens", clock]
        ratios = sorted(t / p for t, p in zip(tokens, plain))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        name = "latency" if clock == "wall" else "cpu_time"
        result.update({f"{name}_plain_s": statistics.median(plain), f"{name}_tokens_s": statistics.median(tokens),
                       f"{name}_overhead_pct": 100 * (statistics.median(ratios) - 1),
                       f"{name}_overhead_iqr_pct": 100 * (q3 - q1) / 2,
                       f"{name}_overhead_ms_per_step": 1000 * statistics.median(
                           [(t - p) * batch / steps for t, p in zip(tokens, plain)])})
    mb = 2 ** 20
    result.update(weights_mb=weights / mb, token_params_mb=token_bytes / mb,
                  activations_plain_mb=activations["plain"] / mb, activations_tokens_mb=activations["tokens"] / mb,
                  peak_memory_plain_mb=memory["plain"] / mb, peak_memory_tokens_mb=memory["tokens"] / mb,
                  peak_memory_overhead_pct=100 * (memory["tokens"] / memory["plain"] - 1))
    return result


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", help=f"one of {', '.join(models.FAMILIES)}")
    p.add_argument("--pretrained", default=None, help="local folder of the backbone (default: hub / weights/)")
    p.add_argument("--random-init", action="store_true",
                   help="tiny models: random weights (tests); sd3 with --bench: the real-size transformer, random")
    p.add_argument("--tokens", default=None, help="soft-token file (softtokens.save) or a folder of SoftREPA .pth")
    p.add_argument("--no-tokens", action="store_true", help="sample the plain model (ignore --tokens)")
    p.add_argument("--ema", action="store_true", help="pair-token files: sample with the EMA copies")
    p.add_argument("--neg-uncond", action="store_true", help="psi- on the unconditional branch (AGSM Table 5 (i))")
    p.add_argument("--compare", action="store_true", help="also sample without tokens, side by side in the grid")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts", default=None, help="text file (a prompt a line) or JSONL with a \"prompt\" field")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    p.add_argument("--steps", type=int, default=None, help="default: the family's (models.FAMILIES)")
    p.add_argument("--cfg", type=float, default=None, help="default: the family's")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the family's)")
    p.add_argument("--batch", type=int, default=16, help="images per denoiser batch")
    p.add_argument("--out", default="out/sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on a GPU, float32 on the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bench", action="store_true", help="measure latency and peak memory with / without tokens")
    p.add_argument("--repeats", type=int, default=5, help="--bench: timed runs of each variant")
    return p.parse_args(argv)


def check_args(args):
    """Every one-line error that needs no model, before the model is loaded."""
    models.check_name(args.model)
    tiny = args.model.startswith("tiny-")
    if args.random_init and not tiny and not (args.bench and args.model == "sd3"):
        raise SystemExit("--random-init builds the tiny models, and SD3's real-size transformer for --bench")
    if not args.bench and (args.prompt is None) == (args.prompts is None):
        raise SystemExit("give the prompts with exactly one of --prompt TEXT or --prompts FILE")
    if args.no_tokens:
        args.tokens = None
    if args.tokens is None and (args.ema or args.neg_uncond or args.compare):
        raise SystemExit("--ema, --neg-uncond and --compare act on soft tokens: pass --tokens FILE")
    if args.tokens is not None and not os.path.exists(args.tokens):
        raise SystemExit(f"no token file or folder at {args.tokens}")
    if (args.steps is not None and args.steps < 1) or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--steps, --batch and --repeats must be at least 1")
    args.size = args.size or models.FAMILIES[args.model]["size"]
    check_size(args.model, args.size)


def load_backbone(args):
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    if args.random_init:
        bb = models.build_tiny(args.model) if args.model.startswith("tiny-") else random_real_backbone(args.model)
        return bb.to(args.device, dtype)                      # built on the CPU in float32
    return models.load(args.model, pretrained=args.pretrained, device=args.device, dtype=dtype)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = models.FAMILIES[args.model]
    steps = args.steps or facts["sample"]["steps"]
    cfg = facts["sample"]["cfg"] if args.cfg is None else args.cfg
    items = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(args.prompts) if args.prompts else []
    check_prompts(args.model, [item["prompt"] for item in items])
    sets, info = (None, dict(token_set=None, blocks=None))
    if args.tokens is not None:
        sets, info = read_tokens(args.tokens, args.model, args.ema, args.neg_uncond)
    if not args.bench:
        data.check_writable(args.out)   # before the work: a read-only --out must not lose the images

    bb = load_backbone(args)

    if args.bench:
        if sets is None:  # no file: random tokens of the family's layout (cost does not depend on values)
            sets = [softtokens.SoftTokens(facts["token_layers"], facts["n_tokens"], hooks.token_width(bb.denoiser),
                                          facts["time_table"])]
        cond = uncond = None
        if bb.pipe is None and bb.text_encoder is None:
            cond, uncond = random_text(bb, args.batch, 0), random_text(bb, args.batch, 1)
        result = bench(bb, sets, steps, cfg, args.size, args.batch, args.repeats, info["blocks"], cond, uncond)
        print(json.dumps(result, indent=1))
        return result

    uncond_set = 1 if args.neg_uncond else None
    jobs = [(item, seed) for item in items for seed in args.seed]
    variants = (["plain", "tokens"] if args.compare else ["tokens"]) if sets is not None else ["plain"]
    images = {}
    from tqdm import tqdm
    for variant in variants:
        handle = attach_tokens(bb, sets, info["blocks"]) if variant == "tokens" else None
        out = []
        for start in tqdm(range(0, len(jobs), args.batch), desc=f"sampling ({variant})"):
            part = jobs[start:start + args.batch]
            out.append(generate(bb, [it["prompt"] for it, _ in part], [s for _, s in part], steps, cfg, args.size,
                                handle, uncond_set if variant == "tokens" else None))
        if handle is not None:
            handle.remove()
        images[variant] = torch.cat(out)

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    records, ordered = [], []
    for k, (item, seed) in enumerate(jobs):
        for variant in variants:
            suffix = f"-{variant}" if len(variants) > 1 else ""
            name = os.path.join("images", f"{k:05d}{suffix}.png")
            save_image(images[variant][k], os.path.join(args.out, name))
            ordered.append(images[variant][k])
            with_tokens = variant == "tokens"
            record = dict(image=name, prompt=item["prompt"], seed=seed, variant=variant, model=args.model,
                          tokens=args.tokens if with_tokens else None,
                          token_set=info["token_set"] if with_tokens else None,
                          uncond=("psi-" if args.neg_uncond else "psi+") if with_tokens else "none",
                          steps=steps, cfg=cfg, size=args.size, random_init=args.random_init)
            if "spec" in item:
                record["spec"] = item["spec"]
            records.append(record)
    with open(os.path.join(args.out, "records.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    save_grid(torch.stack(ordered), os.path.join(args.out, "grid.png"), per_cell=len(variants))
    print(f"{len(records)} images, grid.png and records.jsonl in {args.out}")
    return records


if __name__ == "__main__":
    main()
