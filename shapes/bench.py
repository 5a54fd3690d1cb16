"""
bench.py: what the soft tokens cost. Training: a step of SoftREPA against AGSM (step.train_step, the
very function train.py runs), and the hooks' cost on a forward. Sampling (--sampling): latency and peak
memory with and without the tokens (SoftREPA Table 1: +1.3% latency, no extra memory).

    python -m shapes.bench --model tiny-sd3 --batch 4 --steps 10
    python -m shapes.bench --model sd1.5 --size 256 --batch 2 --steps 2     # real-size UNet, random weights
    python -m shapes.bench --model sd3 --batch 4      # on a GPU: the real thing (--sampling: sampling instead)
    python -m shapes.bench --model flux-dev --size 512 --configs softrepa agsm --rows-per-forward 1 --json r.json
    python -m shapes.bench --model sd3 --size 512 --ddp    # a step against it + DDP's all-reduce (one-rank group)

Real families are built from their configs in families.FAMILIES with random weights (timing does not
depend on the weights; nothing is downloaded), e.g. SD3-medium's MM-DiT (24 layers, 24 x 64 heads), made
on the device they run on; --test-size takes the family's test-size denoiser instead (CPU checks).
Text features are random tensors of the real shapes,
fed as the encoding cache feeds them (data.py): the text encoders and the VAE run outside what is
compared here. On a CPU a real-size step takes minutes: pass a small --size (256 px) and few --steps.

Training, side by side in one run (configurations take turns each round: a drift hits all alike), medians:
  forward, no tokens / forward, tokens     no-grad forward of the B x B pairs, hooks off / on
  softrepa, agsm, dsm                      step.train_step for each loss (forward, loss, backward, AdamW)
Theory for AGSM / SoftREPA: the backbone is frozen, so backward (activation gradients only) ~ one forward:
softrepa = forward + backward ~ 2F, agsm = that + a no-grad EMA forward ~ 3F: 1.5.
FLOPs per step are counted with torch's FlopCounterMode on the warm-up round; on CUDA, model FLOPs
utilisation = FLOPs / time / peak (nanoGPT's estimate_mfu, with counted instead of estimated FLOPs), the
peak read from the card's name (PEAK_BF16_FLOPS) or given by --peak-tflops. `python -m shapes.gpu_jobs --set
speed` runs this file's commands on one GPU, one at a time, and gathers their --json results in one table.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

import run
import sampler
import trained
from shapes import backbones

if __package__ in (
    None,
    "",
):  # `python shapes/bench.py`: the repo root on the path, as `python -m shapes.bench` has it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import families
import files
import flags
import hooks
import models
import recipe
import softtokens
import step

# -----------------------------------------------------------------------------
# The encoding cache's size (data.py)


def bytes_per_sample(latent, text, pooled, bytes_per_number):
    """Bytes of one (image, caption) sample: latent (C, h, w), text (tokens, d), pooled width."""
    return (int(np.prod(latent)) + int(np.prod(text)) + pooled) * bytes_per_number


COCO_TRAIN2017 = (118_287, 591_753)  # images, captions
RELEASED_TB = {"sd3": 9.1, "sdxl": 1.4, "sd1.5": 1.1}  # the SoftREPA README's COCO encodings


def print_cache_sizes():
    """`python -m shapes.bench --cache-sizes`: what data.py's encoding cache takes per sample and for COCO."""
    images, captions = COCO_TRAIN2017
    print("bytes per (image, caption) sample of the encoding cache (ours: bf16; the released code: fp32 .pt files)")
    for name in [n for n in families.FAMILIES if not models.is_shapes_world(n)]:
        latent, text, pooled = models.feature_shapes(name)  # at the family's training size
        bf16, fp32 = bytes_per_sample(latent, text, pooled, 2), bytes_per_sample(latent, text, pooled, 4)
        all5 = images * bytes_per_sample(latent, (0,), 0, 2) + captions * bytes_per_sample((0,), text, pooled, 2)
        print(
            f"  {name:6s} latents {'x'.join(map(str, latent))} + text {'x'.join(map(str, text))} + pooled "
            f"{pooled}: bf16 {bf16:,} B ({bf16 / 1e6:.2f} MB), fp32 {fp32:,} B ({fp32 / 1e6:.2f} MB)"
        )
        print(
            f"         COCO train2017 in bf16: one caption per image {images * bf16 / 1e12:.2f} TB, all "
            f"{captions:,} captions {all5 / 1e12:.2f} TB; fp32 one per image {images * fp32 / 1e12:.2f} TB; "
            f"released README: {RELEASED_TB.get(name, '-')} TB"
        )


def pair_matrix(B, K, diagonal_only, device):
    """(rows, cols) of the flattened pair matrix: pair (i, j), image i with caption j, is batch row i*K + j."""
    if diagonal_only:
        return torch.arange(B, device=device), torch.arange(B, device=device)
    return torch.arange(B, device=device).repeat_interleave(K), torch.arange(K, device=device).repeat(B)


# Dense bf16 tensor-core peaks (the datasheets'), by the words of torch.cuda.get_device_name(): the most
# specific entry whose words are all in the name ("NVIDIA H100 PCIe" is the PCIe card, "NVIDIA H100 80GB HBM3"
# the SXM one). A card not listed has no MFU unless --peak-tflops gives its peak.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def peak_flops(device_name):
    """The bf16 peak in FLOP/s of the card named `device_name` (PEAK_BF16_FLOPS), or None if unknown."""
    words = device_name.replace("-", " ").split()
    known = [k for k in PEAK_BF16_FLOPS if all(w in words for w in k.split())]
    return PEAK_BF16_FLOPS[max(known, key=lambda k: len(k.split()))] if known else None


def random_batch(bb, B, size, seed=0):
    """A batch in the encoding cache's format (data.get_batch): latents and text features of the family's
    real shapes with random values, and B distinct captions (so no pair is a duplicate)."""
    hidden, pooled = models.random_text_features(bb, B, seed)
    latents = torch.randn((B,) + models.latent_shape(bb, size), generator=torch.Generator().manual_seed(seed + 1))
    return dict(latents=latents, hidden=hidden, pooled=pooled, captions=[f"caption {i}" for i in range(B)], new_bad=0)


def make_step(bb, batch, loss, rows_per_forward=0):
    """(run, tokens): `run()` is one step.train_step of `loss` on `batch` with the papers' recipe (and
    --rows-per-forward), its own tokens and AdamW, the hooks attached for it alone."""
    settings = SimpleNamespace(**recipe.defaults(bb.name, loss, steps=100000, rows_per_forward=rows_per_forward))
    tokens = softtokens.make_tokens(bb, loss, init="normal").to(bb.device)
    opt = torch.optim.AdamW(tokens.trainable(), lr=settings.lr, weight_decay=settings.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(bb.device.type, enabled=bb.dtype == torch.float16)
    steps = {"n": 0}

    def run():
        handle = softtokens.attach_tokens(bb, tokens.sets)
        step.train_step(bb, tokens, handle, opt, sched, scaler, settings, batch, steps["n"])
        steps["n"] += 1
        handle.remove()

    return run, tokens


def training_configs(bb, B, size, rows_per_forward=0, names=None):
    """The timed functions (all, or those `names` of "forward", "softrepa", "agsm", "dsm"): each runs one
    forward or one training step, the hooks attached for it alone; with the pairs it handles."""
    batch = random_batch(bb, B, size)
    forward_tokens = softtokens.make_tokens(bb, "softrepa", init="normal").to(bb.device)  # built once, untimed

    def forward(with_tokens):
        handle = softtokens.attach_tokens(bb, forward_tokens.sets) if with_tokens else None
        x0, cond = step.encode_batch(bb, batch)
        x_t, timesteps, _ = step.draw_noise(bb, x0, 0, 0, 0)
        rows, cols = pair_matrix(B, B, False, bb.device)
        with torch.no_grad(), step.autocast(bb):
            models.denoise(bb, x_t[rows], timesteps[rows], models.index_cond(cond, cols))
        if handle:
            handle.remove()

    makers = {
        "forward, no tokens": (lambda: lambda: forward(False), B * B),
        "forward, tokens": (lambda: lambda: forward(True), B * B),
        "softrepa": (lambda: make_step(bb, batch, "softrepa", rows_per_forward)[0], B * B),
        "agsm": (lambda: make_step(bb, batch, "agsm", rows_per_forward)[0], B * B),
        "dsm": (lambda: make_step(bb, batch, "dsm", rows_per_forward)[0], B),
    }
    chosen = lambda name: names is None or name.split(",")[0] in names  # noqa: E731  "forward": both forwards
    return {name: (make(), pairs) for name, (make, pairs) in makers.items() if chosen(name)}


def time_configs(configs, device, rounds):
    """({name: FLOPs}, {name: median seconds}, {name: peak GiB, CUDA only}) of functions that take turns each
    round (a drift hits all alike), after one warm-up round that counts their FLOPs (torch's FlopCounterMode)
    and lets kernels and allocators settle."""
    from torch.utils.flop_counter import FlopCounterMode

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops, peak_mem = {}, {}
    for name, (fn, _) in configs.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (fn, _) in configs.items():  # the configurations take turns within each round
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak_mem[name] = run.peak_memory_gb(device)
    return flops, {name: statistics.median(t) for name, t in times.items()}, peak_mem


def device_peak(device, peak_tflops=None):
    """The peak FLOP/s that MFU divides by: --peak-tflops, else the CUDA card's (PEAK_BF16_FLOPS), else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def bench_training(bb, args, size, precision, rows_per_forward=0, names=None):
    """Times and FLOPs of the training configurations (all, or `names`) at args.batch images per step,
    args.steps timed rounds; prints the table. Returns the medians, FLOPs, peak memory and MFU."""
    configs = training_configs(bb, args.batch, size, rows_per_forward, names)
    device = bb.device
    print(
        f"{args.model}: {sum(p.numel() for p in bb.denoiser.parameters()) / 1e6:.1f}M parameters (random), "
        f"{size} px, batch {args.batch} ({args.batch**2} pairs), {precision} on {device.type}"
        + (f", {rows_per_forward} rows per forward" if rows_per_forward else "")
    )
    flops, median, peak_mem = time_configs(configs, device, args.steps)
    peak = device_peak(device, args.peak_tflops)
    print(
        f"{'configuration':22s} {'ms/step':>10s} {'pairs/s':>9s} {'GFLOP':>10s} {'TFLOP/s':>8s} "
        f"{'MFU':>6s} {'peak GB':>8s}"
    )
    mfu = {name: flops[name] / median[name] / peak for name in configs} if peak else {}
    for name, (_, n_pairs) in configs.items():
        rate = flops[name] / median[name]
        shown = f"{mfu[name]:6.1%}" if peak else "     -"
        mem = f"{peak_mem[name]:8.2f}" if name in peak_mem else "       -"
        print(
            f"{name:22s} {1e3 * median[name]:10.1f} {n_pairs / median[name]:9.1f} {flops[name] / 1e9:10.1f} "
            f"{rate / 1e12:8.3f} {shown} {mem}"
        )
    if device.type != "cuda":
        print(f"peak memory (process RSS, all configurations): {run.peak_memory_gb(device):.2f} GB")
    if {"agsm", "softrepa"} <= set(configs):
        print(
            f"agsm / softrepa step time:           {median['agsm'] / median['softrepa']:.2f}  (theory ~1.5: one "
            f"more no-grad forward; FLOP ratio {flops['agsm'] / flops['softrepa']:.2f})"
        )
    if {"forward, tokens", "forward, no tokens"} <= set(configs):
        print(f"hooks' cost, forward with / without: {median['forward, tokens'] / median['forward, no tokens']:.2f}")
    return dict(
        median=median,
        flops=flops,
        peak_mem=peak_mem,
        mfu=mfu,
        pairs={n: p for n, (_, p) in configs.items()},
        batch=args.batch,
        rows_per_forward=rows_per_forward,
    )


def bench_training_that_fits(bb, args, size, precision):
    """bench_training at --rows-per-forward (0: the whole batch at once), halved while a step runs out of GPU
    memory: the same step in smaller forwards (step.py), what train.py's flag does."""
    rows = min(args.rows_per_forward or args.batch, args.batch)
    while True:
        try:
            return bench_training(bb, args, size, precision, rows, args.configs)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            print(f"out of memory at {rows} rows per forward; trying {rows // 2}", flush=True)
        rows //= 2
        gc.collect()
        torch.cuda.empty_cache()


def bench_ddp(bb, B, size, rounds, loss="softrepa", rows_per_forward=0):
    """A training step against the same step with what DDP adds to it, on a one-rank process group (nccl on
    CUDA, gloo on the CPU): the one flat all-reduce of the token gradients and the logged numbers that
    step.all_reduce_mean runs at world > 1. (At world 1 train_step skips it, so here it runs after the step,
    on the same bytes.) One rank: the collective's own cost, no network. Returns the medians and the bytes."""
    import tempfile

    import torch.distributed as dist

    batch = random_batch(bb, B, size)
    plain, _ = make_step(bb, batch, loss, rows_per_forward)
    in_ddp, tokens = make_step(bb, batch, loss, rows_per_forward)

    def ddp():
        in_ddp()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tokens.trainable()]
        flat = torch.cat([g.flatten() for g in grads] + [grads[0].new_zeros(len(step.STATS))])
        dist.all_reduce(flat)

    backend = "nccl" if bb.device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        if bb.device.type == "cuda":
            torch.cuda.set_device(bb.device)
        dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            _, median, _ = time_configs({"plain": (plain, B * B), f"ddp {backend}": (ddp, B * B)}, bb.device, rounds)
        finally:
            dist.destroy_process_group()
    n_bytes = sum(p.numel() for p in tokens.trainable()) * 4 + len(step.STATS) * 4
    return dict(median=median, backend=backend, all_reduce_bytes=n_bytes, batch=B)


# -----------------------------------------------------------------------------
# The activation term of the memory model (docs/cost.md), checked where it can be: the bytes a training
# step holds for backward grow with the positions each block sees -- MM-DiT: (S/16)^2 image patches +
# 589 text positions (+ the tokens) per block; UNet: the latent pixels (S/8)^2 at each level, the
# attention kept out of it by SDPA's fused kernels. --memory-check measures one dsm step (1 pair) at a
# few sizes and prints each size's extra bytes over the smallest beside the model's ratio.


def positions(bb, size):
    """What the activation term is proportional to, per pair: MM-DiT tokens per block; UNet latent pixels."""
    side = size // bb.facts["vae_factor"]
    if bb.facts["arch"] == "mmdit":  # FLUX: its packing is the patch
        patch = bb.facts["pack"] or bb.denoiser.config.patch_size
        return (side // patch) ** 2 + bb.facts["text_tokens"] + bb.facts["n_tokens"]
    return side * side


def memory_check(bb, sizes):
    rows = []
    settings = SimpleNamespace(**recipe.defaults(bb.name, "dsm", steps=100))
    tokens = softtokens.make_tokens(bb, "dsm", init="normal").to(bb.device)  # (no text encoder here)
    opt = torch.optim.AdamW(tokens.trainable(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(bb.device.type, enabled=False)
    handle = softtokens.attach_tokens(bb, tokens.sets)
    for size in sizes:
        batch = random_batch(bb, 1, size)
        peak = allocated_peak(
            lambda batch=batch: step.train_step(bb, tokens, handle, opt, sched, scaler, settings, batch, 0)
        )
        rows.append((size, positions(bb, size), peak))
        print(f"{bb.name} {size} px: {rows[-1][1]} positions per block, step peak {peak / 2**30:.3f} GiB", flush=True)
    handle.remove()
    (s0, p0, m0) = rows[0]
    print(
        f"{'size':>6s} {'positions':>10s} {'peak GiB':>9s} {'extra over ' + str(s0) + ' px':>18s} "
        f"{'model ratio':>12s} {'measured ratio':>15s}"
    )
    for size, p, m in rows:
        extra = (m - m0) / 2**30
        model = (p - p0) / (rows[1][1] - p0) if len(rows) > 1 else 0
        measured = (m - m0) / (rows[1][2] - m0) if len(rows) > 1 and rows[1][2] != m0 else 0
        print(f"{size:6d} {p:10d} {m / 2**30:9.3f} {extra:18.3f} {model:12.2f} {measured:15.2f}")
    return rows


# The memory and time model of a real-size training step (docs/cost.md), per rank, bf16:
#   memory  = weights (denoiser + text encoders + VAE, all on the GPU as train.py keeps them)
#           + activations per pair x pairs per forward (--rows-per-forward rows x B captions)
#   activations per pair: MM-DiT  k x blocks x positions x width x 2 bytes, positions = (S/16)^2 + 589 + m (SD3);
#                         UNet    c x latent pixels (S/8)^2
#   FLOPs per step = a x the forward of the pair matrix (softrepa: forward + activation backward; agsm:
#   + the EMA forward; --grad-checkpointing: + one more forward), at 40% MFU of an H100 (989 TFLOP/s)
# The constants were measured with this file on the H200 (docs/results/bench-*.txt; random weights, 16
# pairs at 512 px and 4 at 1024): k = 11.5 (1.72 with checkpointing) from SD3 at 512 px, which predicts SD3
# at 1024 px to 0.4% (3%); SD1.5's c at 512 px. SDXL's c is computed: its CPU slope (--memory-check 256 320
# 384, fp32) times SD1.5's GPU-bf16 / CPU-fp32 ratio. Text encoders' and VAEs' parameters: the hub configs'.
# FLUX: its 19 double- and 38 single-stream blocks each count as one SD3 block of k (a single-stream block keeps
# per position what a joint one does), width 3072, over (S/16)^2 + T5 positions (checked at 512 px: 6.12 GB
# measured, 6.20 modelled); FLOPs: flux-dev's measured 512 px forward x the ratio of positions. CLIP-L + T5-XXL.
CLIP_L, BIG_G, T5, VAE = 123.1e6, 694.7e6, 4762.3e6, 83.8e6
TEXT_AND_VAE_PARAMS = {
    "sd3": (CLIP_L + BIG_G + T5, VAE),
    "sdxl": (CLIP_L + BIG_G, 83.7e6),
    "sd1.5": (CLIP_L, 83.7e6),
    "flux-dev": (CLIP_L + T5, VAE),
    "flux-schnell": (CLIP_L + T5, VAE),
}
TEXT_AND_VAE_PARAMS["sd3.5-medium"] = TEXT_AND_VAE_PARAMS["sd3.5-large"] = TEXT_AND_VAE_PARAMS["sd3"]
MMDIT_K = {False: 11.5, True: 1.72}
UNET_BYTES_PER_LATENT_PIXEL = {"sd1.5": {False: 0.932e9 / 4096, True: 0.238e9 / 4096}}
STEP_OVER_FORWARD = {("softrepa", False): 2.19, ("agsm", False): 3.19, ("softrepa", True): 3.18, ("agsm", True): 4.18}
FORWARD_GFLOP_PER_PAIR = {
    ("sd3", 512): 33719.2 / 16,
    ("sd3", 1024): 35617.4 / 4,
    ("sd1.5", 512): 12852.4 / 16,
    ("flux-dev", 512): 86010.4 / 4,
    ("sdxl", 128): 145.1,
}  # H200; sdxl: CPU, 128 px, 1 pair
# The text positions those MM-DiT forwards ran with: SD3's were measured at the stock pipeline's 77 CLIP + 256
# T5 positions, before SD3's default became the authors' 77 + 512 (families.py); a row scales a measured
# forward by its own image + text positions over the measured ones (the projections and MLPs, which dominate
# the FLOPs, are linear in the positions; attention's quadratic share is left out of the scaling).
MEASURED_TEXT_TOKENS = {"sd3": 333, "flux-dev": 512}


def mmdit_positions(name, size, text_tokens=None):
    return (size // 16) ** 2 + (text_tokens or families.FAMILIES[name]["text_tokens"])


def activation_bytes_per_pair(name, size, checkpointing, sdxl_cpu_slope=None):
    facts, config = families.FAMILIES[name], models.denoiser_config(name)
    if facts["arch"] == "mmdit":
        patch = facts["pack"] or config["patch_size"]  # FLUX: its packing is the patch
        positions = (size // 8 // patch) ** 2 + facts["text_tokens"] + facts["n_tokens"]
        width = config["num_attention_heads"] * config["attention_head_dim"]
        blocks = config["num_layers"] + config.get("num_single_layers", 0)  # FLUX: double + single stream
        return MMDIT_K[checkpointing] * blocks * positions * width * 2
    per_pixel = dict(UNET_BYTES_PER_LATENT_PIXEL)
    if sdxl_cpu_slope:  # fp32 CPU bytes per latent pixel, scaled by SD1.5's GPU/CPU ratio (3.45e-4 GiB on CPU)
        gpu_over_cpu = per_pixel["sd1.5"][False] / (3.45e-4 * 2**30)
        gc_share = per_pixel["sd1.5"][True] / per_pixel["sd1.5"][False]
        per_pixel["sdxl"] = {False: sdxl_cpu_slope * gpu_over_cpu, True: sdxl_cpu_slope * gpu_over_cpu * gc_share}
    return per_pixel[name][checkpointing] * (size // 8) ** 2


def print_memory_model(sdxl_cpu_slope, gpu_gb=80, mfu=0.4, peak=989e12):
    print(
        f"| family, px | loss, batch | weights GB | act./pair GB (ckpt) | pairs | largest --rows-per-forward "
        f"in {gpu_gb} GB (ckpt) | TFLOP/step | s/step at {mfu:.0%} MFU, H100 (ckpt) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sd3_params = sum(p.numel() for p in models.random_denoiser_on_meta("sd3").parameters())
    for name, size in (
        ("sd3", 512),
        ("sd3", 1024),
        ("sdxl", 512),
        ("sdxl", 1024),
        ("sd1.5", 512),
        ("sd3.5-medium", 1024),
        ("sd3.5-large", 1024),
        ("flux-dev", 512),
        ("flux-dev", 1024),
        ("flux-schnell", 1024),
    ):
        denoiser = sum(p.numel() for p in models.random_denoiser_on_meta(name).parameters())
        text, vae = TEXT_AND_VAE_PARAMS[name]
        weights = 2 * (denoiser + text + vae)
        acts = {gc: activation_bytes_per_pair(name, size, gc, sdxl_cpu_slope) for gc in (False, True)}
        key = (name, size) if (name, size) in FORWARD_GFLOP_PER_PAIR else None
        measured = lambda n, side: mmdit_positions(n, side, MEASURED_TEXT_TOKENS[n])  # what the H200 ran
        if name.startswith("flux") and not key:  # FLUX's measured 512 px forward, x the ratio of positions
            gflop = FORWARD_GFLOP_PER_PAIR[("flux-dev", 512)] * mmdit_positions(name, size) / measured("flux-dev", 512)
        elif name.startswith("sd3"):  # SD3's measured FLOPs per pair at this size, x the position (and SD3.5's
            # parameter) ratios: SD3's own rows are computed too, its text now 589 positions long, not 333
            params = denoiser / sd3_params
            gflop = (
                FORWARD_GFLOP_PER_PAIR[("sd3", size)] * params * mmdit_positions(name, size) / measured("sd3", size)
            )
        else:
            gflop = FORWARD_GFLOP_PER_PAIR[key] if key else FORWARD_GFLOP_PER_PAIR[("sdxl", 128)] * (size / 128) ** 2
        for loss in ("softrepa", "agsm"):
            B = families.FAMILIES[name][loss]["batch"]
            rows = {gc: max(0, min(B, int((gpu_gb * 1e9 * 0.9 - weights) // (B * acts[gc])))) for gc in (False, True)}
            tflop = {gc: STEP_OVER_FORWARD[(loss, gc)] * gflop * B * B / 1e3 for gc in (False, True)}
            seconds = {gc: tflop[gc] * 1e12 / (mfu * peak) for gc in (False, True)}
            print(
                f"| {name}, {size} | {loss}, {B}x{B} | {weights / 1e9:.1f} "
                f"| {acts[False] / 1e9:.2f} ({acts[True] / 1e9:.2f}) | {B * B} | {rows[False]} ({rows[True]}) "
                f"| {tflop[False]:.0f} | {seconds[False]:.2f} ({seconds[True]:.2f}) |"
            )


# -----------------------------------------------------------------------------
# Sampling (SoftREPA Table 1: latency and peak memory with and without soft tokens)


def allocated_peak(run):
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
        current += e.nbytes()  # + allocation, - free
        peak = max(peak, current)
    return peak


def bench_sampling(bb, loaded, steps, cfg, size, batch=1, repeats=5, cond=None, uncond=None, progress=True):
    """Latency and peak memory of `steps` guided sampler steps on `batch` images, with and without the
    trained file `loaded` (trained.read, or a trained.Trained of random tokens) attached (psi+ on both CFG
    branches, the default). Plain and tokens runs
    alternate, so a slow spell of a shared machine hits both; times are medians over `repeats`, in
    seconds per image, and the overhead is the median of the paired ratios. Returns a dict of numbers."""
    if cond is None:
        cond = models.encode_prompts(bb, ["a red circle above a blue square"] * batch)
        uncond = models.encode_prompts(bb, [""] * batch)
    shape = models.latent_shape(bb, size)
    x = sampler.initial_noise(shape, range(batch)).to(bb.device, bb.dtype)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)

    def run(handle):
        sampler.sample_loop(bb, x, cond, uncond, steps, cfg, handle)
        sync()

    def with_variant(variant, fn):
        handle = trained.attach(bb, loaded) if variant == "tokens" else None
        try:
            return fn(handle)
        finally:
            if handle is not None:
                handle.remove()

    # Wall-clock time, and on the CPU also the process's CPU time: on a shared machine the wall clock
    # counts the time other processes held the cores, the CPU time only this process's own work.
    times = {(v, clock): [] for v in ("plain", "tokens") for clock in ("wall", "cpu")}
    for variant in ("plain", "tokens"):  # warm-up (first calls allocate and pick kernels)
        with_variant(variant, run)
    loop = range(repeats)
    if progress:
        from tqdm import tqdm

        loop = tqdm(loop, desc="bench", leave=False)
    for r in loop:
        for variant in ("plain", "tokens") if r % 2 == 0 else ("tokens", "plain"):

            def timed(handle):
                wall, cpu = time.perf_counter(), time.process_time()
                run(handle)
                return time.perf_counter() - wall, time.process_time() - cpu

            wall, cpu = with_variant(variant, timed)
            times[variant, "wall"].append(wall / batch)
            times[variant, "cpu"].append(cpu / batch)
    # peak memory = the weights (+ the tokens' own parameters) + the activations' peak above them
    activations = {v: with_variant(v, lambda h: allocated_peak(lambda: run(h))) for v in ("plain", "tokens")}
    weights = sum(p.numel() * p.element_size() for p in bb.denoiser.parameters())
    token_bytes = sum(p.numel() * p.element_size() for p in loaded.sets[0].parameters())
    memory = {"plain": weights + activations["plain"], "tokens": weights + token_bytes + activations["tokens"]}
    clocks = ["wall", "cpu"] if bb.device.type == "cpu" else ["wall"]
    result = dict(
        model=bb.name,
        size=size,
        steps=steps,
        batch=batch,
        cfg=cfg,
        repeats=repeats,
        device=str(bb.device),
        dtype=str(bb.dtype).removeprefix("torch."),
        token_shape=list(loaded.sets[0].shape),
    )
    for clock in clocks:
        # the overhead from paired runs (adjacent in time, so a slow spell hits both): the median of the
        # per-repeat ratios, with half their interquartile range as its uncertainty; also in ms per sampler step
        plain, tokens = times["plain", clock], times["tokens", clock]
        ratios = sorted(t / p for t, p in zip(tokens, plain))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        name = "latency" if clock == "wall" else "cpu_time"
        result.update(
            {
                f"{name}_plain_s": statistics.median(plain),
                f"{name}_tokens_s": statistics.median(tokens),
                f"{name}_overhead_pct": 100 * (statistics.median(ratios) - 1),
                f"{name}_overhead_iqr_pct": 100 * (q3 - q1) / 2,
                f"{name}_overhead_ms_per_step": 1000
                * statistics.median([(t - p) * batch / steps for t, p in zip(tokens, plain)]),
            }
        )
    mb = 2**20
    result.update(
        weights_mb=weights / mb,
        token_params_mb=token_bytes / mb,
        activations_plain_mb=activations["plain"] / mb,
        activations_tokens_mb=activations["tokens"] / mb,
        peak_memory_plain_mb=memory["plain"] / mb,
        peak_memory_tokens_mb=memory["tokens"] / mb,
        peak_memory_overhead_pct=100 * (memory["tokens"] / memory["plain"] - 1),
    )
    return result


# -----------------------------------------------------------------------------


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", help=f"one of {', '.join(families.FAMILIES)}")
    p.add_argument("--sampling", action="store_true", help="time sampling with / without tokens instead of training")
    p.add_argument(
        "--batch",
        type=flags.POSITIVE_INT,
        default=None,
        help="training: images per step, B x B pairs (default 4); sampling: images per sampler batch (default 1)",
    )
    p.add_argument(
        "--steps",
        type=flags.POSITIVE_INT,
        default=None,
        help="training: timed rounds after one warm-up (default 5); sampling: sampler steps (default: the family's)",
    )
    p.add_argument("--size", type=flags.POSITIVE_INT, default=None, help="image size in px (default: the family's)")
    p.add_argument(
        "--precision",
        default=None,
        choices=list(models.PRECISIONS),
        help="default bf16 (training) or fp16 (sampling) on CUDA, fp32 on CPU",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=flags.THREADS, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--peak-tflops",
        type=flags.POSITIVE_FLOAT,
        default=None,
        help="the device's peak, for MFU (default: looked up)",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="sampling: a token file or the released SoftREPA folder "
        "(default: random tokens of the family's layout; the cost does not depend on their values)",
    )
    p.add_argument(
        "--cfg",
        type=flags.NON_NEGATIVE_FLOAT,
        default=None,
        help="sampling: guidance (default: the family's; 1: one branch; 0: the unconditional alone, two branches)",
    )
    p.add_argument("--repeats", type=flags.POSITIVE_INT, default=5, help="sampling: timed runs of each variant")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="training: recompute the frozen backbone in backward (train.py's flag), to measure what it saves",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=["forward", "softrepa", "agsm", "dsm"],
        help="training: what to time (default: all; forward: with and without the tokens' hooks)",
    )
    p.add_argument(
        "--rows-per-forward",
        type=flags.NON_NEGATIVE_INT,
        default=0,
        help="training: image rows per forward (train.py's flag; 0: all), halved while a step runs out of memory",
    )
    p.add_argument(
        "--ddp",
        action="store_true",
        help="a SoftREPA step against the same step with DDP's all-reduce, on a one-rank nccl (gloo) group",
    )
    p.add_argument(
        "--test-size",
        action="store_true",
        help="the family's test-size denoiser (families.py test_denoiser) instead of its real size",
    )
    p.add_argument("--json", default=None, help="write the result here too (shapes/gpu_jobs.py --set speed reads it)")
    p.add_argument("--cache-sizes", action="store_true", help="print the encoding cache's bytes per sample and exit")
    p.add_argument(
        "--memory-check",
        type=flags.POSITIVE_INT,
        nargs="+",
        default=None,
        metavar="SIZE",
        help="peak memory of a 1-pair training step at these sizes, beside the memory model's growth (docs/cost.md)",
    )
    p.add_argument(
        "--memory-model",
        type=flags.real_in(0, 1e12, open_low=True),
        default=None,
        metavar="SDXL_CPU_SLOPE",
        help="print the memory "
        "and time model's table (docs/cost.md), given SDXL's --memory-check slope in bytes per latent pixel",
    )
    p.add_argument(
        "--sdpa",
        default=None,
        choices=["flash", "efficient", "math"],
        help="--memory-check: force "
        "this attention kernel (a GPU runs the fused ones; the CPU may fall back to math, which keeps "
        "the N x N attention weights for backward)",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cache_sizes:
        return print_cache_sizes()
    if args.memory_model:
        return print_memory_model(args.memory_model)
    facts = models.check_name(args.model)
    models.check_device(args.device)  # before anything loads
    size = args.size or facts["size"]
    families.check_size(args.model, size)
    loaded = trained.read(args.tokens, args.model)  # None: random tokens of the family's shape, below
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    torch.backends.cuda.enable_cudnn_sdp(not on_cuda)  # off on CUDA, as in train.py (docs/cost.md)
    precision = args.precision or (("fp16" if args.sampling else "bf16") if on_cuda else "fp32")
    with torch.device(args.device):  # the random weights made where they run (FLUX's 12B: seconds on a GPU)
        bb = backbones.random_backbone(args.model, "test" if args.test_size else "real")
    bb.to(args.device, models.PRECISIONS[precision])
    bb.denoiser.requires_grad_(False)
    if on_cuda:
        torch.cuda.empty_cache()  # the fp32 weights' blocks: not the measurement's memory
    families.check_size(args.model, size, bb=bb)
    if args.grad_checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
    if args.memory_check:
        for side in args.memory_check:
            families.check_size(args.model, side)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }.get(args.sdpa)
        with sdpa_kernel([kernel]) if kernel else nullcontext():
            return memory_check(bb, args.memory_check)
    device = dict(device_name=torch.cuda.get_device_name(bb.device) if on_cuda else "CPU", precision=precision)
    device.update(peak_flops=device_peak(bb.device, args.peak_tflops), peak_from_flag=bool(args.peak_tflops))
    if not args.sampling:
        args.batch, args.steps = args.batch or 4, args.steps or 5
        if args.ddp:
            result = bench_ddp(bb, args.batch, size, args.steps, rows_per_forward=args.rows_per_forward)
            print(json.dumps(result, indent=1))
        else:
            result = bench_training_that_fits(bb, args, size, precision)
        return write_result(args, dict(result, model=args.model, size=size, **device))
    batch = args.batch or 1
    if loaded is None:
        shape = (facts["token_layers"], facts["n_tokens"], hooks.token_width(bb.denoiser), facts["time_table"])
        loaded = trained.Trained("random tokens", "tokens", [softtokens.SoftTokens(*shape)], None, "tokens")
    steps, cfg = args.steps or facts["sample"]["steps"], facts["sample"]["cfg"] if args.cfg is None else args.cfg
    cond, uncond = models.random_text(bb, batch, 0), models.random_text(bb, batch, 1)
    result = bench_sampling(bb, loaded, steps, cfg, size, batch, args.repeats, cond, uncond)
    print(json.dumps(result, indent=1))
    return write_result(args, dict(result, **device))


def write_result(args, result):
    if args.json:
        files.write_json(args.json, result)
    return result


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
