"""
bench.py: what a training step costs, SoftREPA against AGSM, and what the soft-token hooks cost.

    python bench.py --model tiny-sd3 --batch 4 --steps 10
    python bench.py --model sd1.5 --size 256 --batch 2 --steps 2     # real-size UNet, random weights
    python bench.py --model sd3 --batch 4                             # on a GPU: the real thing

Real families are built from their published configs with random weights (timing does not depend on
the weights, and nothing is downloaded): SD3-medium's MM-DiT (24 layers, 24 heads x 64, patch 2, text
stream 333 x 4096 + pooled 2048), SD1.5's UNet (diffusers' default UNet2DConditionModel, text 77 x 768)
and SDXL's UNet (text 77 x 2048 + pooled 1280). Text features are random tensors of the real shapes:
the frozen text encoders run once per step on B captions, outside what is compared here. On a CPU a
real-size step takes minutes: pass a small --size (256 px = 32 x 32 latents) and few --steps.

Measured side by side in one run, the configurations taking turns within every round (so that a
machine whose speed drifts affects them alike), median over rounds:
  forward, no tokens / forward, tokens     no-grad forward of the B x B pairs, hooks off / on
  step, no tokens                          the softrepa step with the hooks off and the gradient taken
                                           w.r.t. the text features instead (the same backward pass)
  softrepa, agsm, dsm                      train.py's step for each loss (forward, loss, backward, AdamW)
Theory for AGSM / SoftREPA: the backbone is frozen, so backward computes activation gradients only,
about one forward; softrepa = forward + backward ~ 2F, agsm = that + a no-grad EMA forward ~ 3F: 1.5.
FLOPs per step are counted with torch's FlopCounterMode on the warm-up round; on CUDA, model FLOPs
utilisation = FLOPs / time / peak (nanoGPT's estimate_mfu, with counted instead of estimated FLOPs).
"""
import argparse
import resource
import statistics
import time

import torch

import hooks
import losses
import models
import softtokens

TEXT_SHAPES = {"sd3": ((333, 4096), 2048), "sdxl": ((77, 2048), 1280), "sd1.5": ((77, 768), None),
               "tiny-sd3": ((16, 128), 128), "tiny-sd1.5": ((16, 128), None)}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense


def build(name, device, dtype):
    """Backbone with random weights: the shapes-world tiny one, or the real-size denoiser alone."""
    facts = models.check_name(name)
    bb = models.build_tiny(name) if facts["hub"] is None else models.real_size_backbone(name)
    bb.denoiser.requires_grad_(False).to(device)
    if dtype != torch.float32:
        bb.denoiser.to(dtype)
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = models.ddpm_alphas_cumprod().to(device)
    return bb


def make_configs(bb, B, size, device, dtype):
    """The timed functions: each runs one forward or one training step on fresh random inputs."""
    facts = bb.facts
    (n_text, width), pooled_width = TEXT_SHAPES[bb.name]
    channels = bb.denoiser.config.in_channels
    latent = size if facts["hub"] is None else size // 8  # tiny: pixel space; real: the VAE's /8
    x0 = torch.randn(B, channels, latent, latent, device=device, dtype=dtype)
    hidden = torch.randn(B, n_text, width, device=device, dtype=dtype)
    pooled = None if pooled_width is None else torch.randn(B, pooled_width, device=device, dtype=dtype)
    blocks = facts["token_blocks"]
    single = softtokens.make_tokens(bb, "softrepa", init="normal").to(device)
    pair = softtokens.make_tokens(bb, "agsm", init="normal").to(device)
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-3, weight_decay=1e-4)
    opt_pair = torch.optim.AdamW(pair.trainable(), lr=1e-3, weight_decay=1e-4)

    def pairs(diagonal_only=False, text_grad=False):
        """The (flattened) pair matrix as train.py builds it: one t and eps per image row."""
        noise = torch.randn_like(x0)
        x_t, timesteps = models.add_noise(bb, x0, noise, torch.rand(B, device=device))
        text = hidden.detach().clone().requires_grad_(text_grad)
        rows = torch.arange(B, device=device) if diagonal_only else torch.arange(B, device=device).repeat_interleave(B)
        cols = torch.arange(B, device=device) if diagonal_only else torch.arange(B, device=device).repeat(B)
        cond = models.index_cond(models.cond_from_features(bb, text, pooled), cols)
        shape = (B, 1 if diagonal_only else B, *x0.shape[1:])
        return x_t[rows], timesteps[rows], cond, models.target(bb, x0, noise), timesteps, shape, text

    def forward(with_tokens):
        handle = hooks.attach(bb.denoiser, single, blocks) if with_tokens else None
        x, t, cond, *_ = pairs()
        with torch.no_grad():
            models.denoise(bb, x, t, cond)
        if handle:
            handle.remove()

    def step(loss_name):
        tokens, opt = (pair, opt_pair) if loss_name == "agsm" else (single, opt_single)
        handle = None if loss_name == "plain" else hooks.attach(
            bb.denoiser, tokens.sets if loss_name == "agsm" else tokens, blocks)
        x, t, cond, target, timesteps, shape, text = pairs(loss_name == "dsm", text_grad=loss_name == "plain")
        if loss_name == "agsm":
            matched = torch.eye(B, dtype=torch.bool, device=device).flatten()
            with torch.no_grad(), handle.rows(torch.where(matched, softtokens.EMA_POS, softtokens.EMA_NEG)):
                pred_ema = models.denoise(bb, x, t, cond).view(shape)
            with handle.rows(torch.where(matched, softtokens.POS, softtokens.NEG)):
                pred = models.denoise(bb, x, t, cond).view(shape)
            loss, _ = losses.agsm_loss(pred, pred_ema, target, timesteps, facts["prediction"], 1.0, 1.0)
        else:
            errors = losses.pair_errors(models.denoise(bb, x, t, cond).view(shape), target)
            loss = losses.dsm_loss(torch.diag(errors[:, 0])) if loss_name == "dsm" else losses.softrepa_loss(errors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if loss_name != "plain":
            opt.step()
        if loss_name == "agsm":
            pair.update_ema(0.999)
        if handle:
            handle.remove()

    return {"forward, no tokens": (lambda: forward(False), B * B), "forward, tokens": (lambda: forward(True), B * B),
            "step, no tokens": (lambda: step("plain"), B * B), "softrepa": (lambda: step("softrepa"), B * B),
            "agsm": (lambda: step("agsm"), B * B), "dsm": (lambda: step("dsm"), B)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", help=f"one of {', '.join(models.FAMILIES)}")
    p.add_argument("--batch", type=int, default=4, help="images per step: B x B pairs")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the family's)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU (default: looked up)")
    args = p.parse_args(argv)
    facts = models.check_name(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = args.size or facts["size"]
    bb = build(args.model, device, dtype)
    configs = make_configs(bb, args.batch, size, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{args.model}: {sum(p.numel() for p in bb.denoiser.parameters()) / 1e6:.1f}M parameters (random), "
          f"{size} px, batch {args.batch} ({args.batch ** 2} pairs), {precision} on {device.type}")

    # warm-up round: counts the FLOPs of every configuration (and lets kernels / allocators settle)
    from torch.utils.flop_counter import FlopCounterMode
    flops, peak_mem = {}, {}
    for name, (fn, _) in configs.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in configs}
    for _ in range(args.steps):
        for name, (fn, _) in configs.items():  # the configurations take turns within each round
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak_mem[name] = torch.cuda.max_memory_allocated() / 2 ** 30

    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    print(f"{'configuration':22s} {'ms/step':>10s} {'pairs/s':>9s} {'GFLOP':>10s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'peak GB':>8s}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, (_, n_pairs) in configs.items():
        rate = flops[name] / median[name]
        mfu = f"{rate / peak:6.1%}" if peak else "     -"
        mem = f"{peak_mem[name]:8.2f}" if name in peak_mem else "       -"
        print(f"{name:22s} {1e3 * median[name]:10.1f} {n_pairs / median[name]:9.1f} {flops[name] / 1e9:10.1f} "
              f"{rate / 1e12:8.3f} {mfu} {mem}")
    if device.type != "cuda":
        print(f"peak memory (process RSS, all configurations): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")
    print(f"agsm / softrepa step time:             {median['agsm'] / median['softrepa']:.2f}  (theory ~1.5: one more "
          f"no-grad forward; FLOP ratio {flops['agsm'] / flops['softrepa']:.2f})")
    print(f"hooks' cost, step with / without tokens: {median['softrepa'] / median['step, no tokens']:.2f}")
    print(f"hooks' cost, forward with / without:     {median['forward, tokens'] / median['forward, no tokens']:.2f}")
    return dict(median=median, flops=flops)


if __name__ == "__main__":
    main()
