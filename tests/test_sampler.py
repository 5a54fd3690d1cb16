"""sampler.py: the samplers against written-out loops (Euler on the flow ODE, DDIM), per-row token sets
in a guided prediction, and the size facts of models.FAMILIES that check_size enforces."""
import pytest
import torch

import tolerances

import hooks
import models
import sampler
import softtokens

torch.set_num_threads(1)
TINY = ["tiny-sd3", "tiny-sd1.5"]


def strong_tokens(bb, cls=softtokens.SoftTokens, seed=0, n_tokens=None):
    """Tokens of the family's layout with unit-size values: their effect survives 8-bit PNGs."""
    torch.manual_seed(seed)
    f = bb.facts
    t = cls(f["token_layers"], f["n_tokens"] if n_tokens is None else n_tokens, hooks.token_width(bb.denoiser))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    return t


def reference_sample(bb, prompts, seeds, steps, cfg, size):
    shape = models.latent_shape(bb, size)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond, uncond = models.encode_prompts(bb, prompts), models.encode_prompts(bb, [""] * len(prompts))

    def guided(x, t):
        tt = torch.full((len(x),), float(t))
        e_u, e_c = models.denoise(bb, x, tt, uncond), models.denoise(bb, x, tt, cond)
        return e_u + cfg * (e_c - e_u)

    with torch.no_grad():
        if bb.facts["prediction"] == "flow":
            s = torch.linspace(1, 0, steps + 1)
            shift = bb.facts["flow_shift"]
            s = shift * s / (1 + (shift - 1) * s)
            for i in range(steps):
                x = x + (s[i + 1] - s[i]) * guided(x, 1000 * s[i])
        else:
            abar = models.ddpm_alphas_cumprod()
            ts = list(range(1 + (steps - 1) * (1000 // steps), 0, -(1000 // steps)))  # 981, ..., 1 at 50 steps
            for i, t in enumerate(ts):
                a, a_next = abar[t], (abar[ts[i + 1]] if i + 1 < steps else abar[0])
                eps = guided(x, t)
                x = a_next.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_next).sqrt() * eps
    return models.decode_latents(bb, x)


def fp32_sampler_tolerance(bb, steps, cfg, per_forward_ulps=64):
    """How far two fp32 runs of the same sampler may drift apart when only the order of summation
    differs (thread count, BLAS kernel, batch layout). Each denoiser forward is trusted to
    `per_forward_ulps` units of fp32 rounding (eps = 2^-23) relative to its unit-size output;
    CFG's e_u + cfg (e_c - e_u) multiplies that by at most 1 + 2 cfg. The sampler's update is linear
    in x and in the prediction, x <- c_x x + c_pred pred, so an error E in x and e in pred become
    |c_x| E + |c_pred| e: we run that recursion over the same schedule as reference_sample.
    For 3 steps at CFG 4 this is ~7e-5 (flow) and ~2e-4 (DDIM, whose first step divides by
    sqrt(abar_t)); a wrong sign or step index moves the output by 1e-2 or more."""
    per_forward = per_forward_ulps * torch.finfo(torch.float32).eps * (1 + 2 * cfg)
    bound = 0.0
    if bb.facts["prediction"] == "flow":
        s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        shift = bb.facts["flow_shift"]
        s = shift * s / (1 + (shift - 1) * s)
        for i in range(steps):                       # x <- x + (s_{i+1} - s_i) v: c_x = 1
            bound += float((s[i + 1] - s[i]).abs()) * per_forward
        return bound
    abar = models.ddpm_alphas_cumprod().double()
    ts = list(range(1 + (steps - 1) * (1000 // steps), 0, -(1000 // steps)))
    for i, t in enumerate(ts):                       # DDIM: c_x = sqrt(a'/a), c_eps = sqrt(1-a') - sqrt(a'(1-a)/a)
        a, a_next = abar[t], (abar[ts[i + 1]] if i + 1 < steps else abar[0])
        c_x, c_eps = (a_next / a).sqrt(), ((1 - a_next).sqrt() - (a_next * (1 - a) / a).sqrt()).abs()
        bound = float(c_x) * bound + float(c_eps) * per_forward
    return bound


@pytest.mark.parametrize("name", TINY)
def test_generate_matches_written_out_sampler(name):
    bb = models.build_tiny(name)
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    got = sampler.generate(bb, prompts, seeds, steps=3, cfg=4.0, size=16)
    want = reference_sample(bb, prompts, seeds, 3, 4.0, 16)
    # The two loops do the same arithmetic, but not in the same batch layout (the sampler runs the
    # unconditional and conditional branches in one batch), so BLAS may sum in another order: the
    # results agree to fp32 rounding, amplified by the sampler, not bit for bit.
    tolerance = fp32_sampler_tolerance(bb, 3, 4.0)
    assert (got - want).abs().max() <= tolerance, ((got - want).abs().max(), tolerance)
    assert sampler.ddim_timesteps(50)[0] == 981 and sampler.ddim_timesteps(50)[-1] == 1


def test_predict_token_rows_are_per_row():
    # cond_set / uncond_set per row: a row with -1 computes the plain model, a row with 0 uses the tokens
    bb = models.build_tiny("tiny-sd3")
    x = torch.randn(2, *models.latent_shape(bb, 16))
    cond, uncond = models.encode_prompts(bb, ["a red circle"] * 2), models.encode_prompts(bb, [""] * 2)
    plain = sampler.predict(bb, x, 500.0, cond, uncond, 4.0)
    handle = hooks.attach(bb.denoiser, strong_tokens(bb))
    try:
        both = sampler.predict(bb, x, 500.0, cond, uncond, 4.0, handle)
        mixed = sampler.predict(bb, x, 500.0, cond, uncond, 4.0, handle, cond_set=torch.tensor([-1, 0]))
        none_cfg1 = sampler.predict(bb, x, 500.0, cond, uncond, 1.0, handle, cond_set=-1)
    finally:
        handle.remove()
    assert tolerances.close(mixed[0], plain[0]) and tolerances.close(mixed[1], both[1])
    assert not torch.allclose(both, plain, atol=1e-3)
    assert tolerances.close(none_cfg1, models.denoise(bb, x, torch.full((2,), 500.0), cond))


def test_size_facts_match_the_models():
    """models.FAMILIES' size facts follow from the architectures (hub configs: SD3-medium patch 2 with a
    192-position table, SD1.5 4 levels, SDXL 3; the tiny configs in models.py)."""
    f = models.FAMILIES
    assert (f["sd3"]["size_multiple"], f["sd3"]["max_size"]) == (8 * 2, 8 * 2 * 192)
    assert (f["sd1.5"]["size_multiple"], f["sdxl"]["size_multiple"]) == (8 * 2 ** 3, 8 * 2 ** 2)
    tiny = {name: f[name]["denoiser"] for name in ("tiny-sd3", "tiny-sd1.5")}
    assert f["tiny-sd3"]["size_multiple"] == f["tiny-sd3"]["vae_factor"] * tiny["tiny-sd3"]["patch_size"]
    assert f["tiny-sd3"]["max_size"] == f["tiny-sd3"]["vae_factor"] * tiny["tiny-sd3"]["patch_size"] * tiny["tiny-sd3"]["pos_embed_max_size"]
    assert f["tiny-sd1.5"]["size_multiple"] == f["tiny-sd1.5"]["vae_factor"] * 2 ** (len(tiny["tiny-sd1.5"]["block_out_channels"]) - 1)
    bb = models.build_tiny("tiny-sd3")
    cond = models.encode_prompts(bb, ["a red circle"])
    models.denoise(bb, torch.randn(1, *models.latent_shape(bb, 32)), 500.0, cond)  # the largest size runs
    with pytest.raises(ValueError):                              # one patch row more does not
        models.denoise(bb, torch.randn(1, *models.latent_shape(bb, 36)), 500.0, cond)
