"""FLUX.1 (issue #27): the flux-dev and flux-schnell families through the code path of SD3, checked against
the stock diffusers FluxPipeline of tests/tiny_pipelines.py (test-size transformer, CLIP, T5, 16-channel VAE,
the hub's scheduler configs): its packing, position ids, time shift and latent normalisation; the stock
pipeline sampling with tokens attached by hooks.attach against our sampler; one AGSM step, per-row sets and
gradient checkpointing on the packed path; and --neg-uncond on the guidance-distilled dev. (Alg. 1 written
out block by block: tests/method/test_hooks.py; train.py and sample.py from a --pretrained folder:
tests/method/test_real_commands.py.)"""

import pytest
import torch
from test_models import agsm_inputs, one_agsm_step

import families
import hooks
import models
import sample
import sampler
import softtokens
import step
from shapes import bench

FLUX = ["flux-dev", "flux-schnell"]


@pytest.fixture(scope="module")
def folders(stock_folder):
    return {family: stock_folder(family) for family in FLUX}


@pytest.fixture(scope="module")
def stock(folders):
    """Each family's backbone loaded from its stock folder: the path of --pretrained."""
    return {family: models.load(family, pretrained=folder) for family, folder in folders.items()}


def strong_tokens(bb, layers=None, seed=0):
    """Unit-size tokens of the family's layout (their effect is far above rounding)."""
    torch.manual_seed(seed)
    facts = bb.facts
    tokens = softtokens.SoftTokens(layers or facts["token_layers"], facts["n_tokens"], hooks.token_width(bb.denoiser))
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_()
    return tokens


@pytest.mark.parametrize("family", FLUX)
def test_the_time_shift_is_the_stock_schedulers(stock, family):
    """dev: mu linear in the packed image tokens (FluxPipeline's calculate_shift with the scheduler config's
    numbers), sigma' = e^mu / (e^mu + 1/sigma - 1); schnell: no shift. Against the stock scheduler's sigmas."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    bb = stock[family]
    scheduler, config = bb.pipe.scheduler, bb.pipe.scheduler.config
    assert config.use_dynamic_shifting == (family == "flux-dev")
    for px, steps in ((256, 28), (512, 4), (1024, 28)):
        side = px // 8
        mu = calculate_shift(
            side * side // 4, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
        ours = sampler.flow_sigmas(steps, families.time_shift(bb.facts, side, side))
        torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)  # float32 rounding of two formulas
    if family == "flux-dev":  # 1.15 at 4096 tokens (1024 px), 0.5 at 256 (256 px)
        assert families.time_shift(bb.facts, 128, 128) == pytest.approx(torch.e**1.15)
        assert families.time_shift(bb.facts, 32, 32) == pytest.approx(torch.e**0.5)


@pytest.mark.parametrize("family", FLUX)
def test_denoise_packs_ids_and_guidance_as_the_pipeline_does(stock, family):
    """models.denoise on (B, 16, h, w) latents = the stock transformer called as FluxPipeline calls it (its own
    _pack_latents, _prepare_latent_image_ids, zero text ids, sigma, guidance), unpacked by _unpack_latents."""
    bb = stock[family]
    pipe, g = bb.pipe, torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 4, generator=g)  # 48 x 32 px: a non-square image
    cond = models.encode_prompts(bb, ["a red cube", "two dogs"])
    sigma = torch.tensor([0.3, 0.8])
    ours = models.denoise(bb, x, sigma * 1000, cond, guidance=3.5)
    guidance = torch.full((2,), 3.5) if family == "flux-dev" else None
    with torch.no_grad():
        stock_out = pipe.transformer(
            pipe._pack_latents(x, 2, 16, 6, 4),
            timestep=sigma * 1000 / 1000,
            guidance=guidance,
            **cond,
            img_ids=pipe._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32),
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
            return_dict=False,
        )[0]
    assert torch.equal(ours, pipe._unpack_latents(stock_out, 48, 32, pipe.vae_scale_factor))
    assert models.latent_normalisation(bb.vae) == (0.3611, 0.1159)  # read from the VAE's config
    if family == "flux-dev":  # training calls (guidance None) use the fixed training guidance, 1.0
        one = models.denoise(bb, x, sigma * 1000, cond, guidance=1.0)
        assert torch.equal(models.denoise(bb, x, sigma * 1000, cond), one) and not torch.equal(one, ours)


def test_dev_trains_at_the_shifted_levels(stock):
    """add_noise: flux-dev's sigma is u through its sampler's shift at the image's size; schnell's is u."""
    x0, eps, u = torch.zeros(1, 16, 8, 8), torch.ones(1, 16, 8, 8), torch.tensor([0.3])
    s = families.time_shift(stock["flux-dev"].facts, 8, 8)
    for family, sigma in (("flux-dev", s * 0.3 / (1 + (s - 1) * 0.3)), ("flux-schnell", 0.3)):
        x_t, t = models.add_noise(stock[family], x0, eps, u)
        torch.testing.assert_close(x_t, torch.full_like(x0, sigma))
        torch.testing.assert_close(t, torch.tensor([1000 * sigma]))
    assert 1.5 < s < 1.65  # 64 px: 16 tokens, mu = 0.5 - 0.65 * 240 / 3840 = 0.459


@pytest.mark.parametrize("family", FLUX)
def test_the_stock_pipeline_with_tokens_equals_our_sampler(stock, family):
    """hooks.attach(pipe.transformer, ...) on the stock FluxPipeline: the tokens change its sample, and our
    sampler (sampler.generate) gives the stock pipeline's latents and images for the same seed and steps:
    schnell bit for bit; dev to float32 rounding (its shifted sigmas, computed by two formulas, differ in
    the last bit). remove() gives the stock sample back bit for bit. One branch a step in both."""
    bb = stock[family]
    pipe, facts = bb.pipe, bb.facts
    steps = 4  # schnell's own; dev's 28 cut to 4
    cfg = facts["sample"]["cfg"]  # dev 3.5 (its guidance input), schnell 1

    def draw(output_type):
        return pipe(
            "a red cube",
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=64,
            width=64,
            max_sequence_length=facts["text_tokens"],
            output_type=output_type,
            generator=torch.Generator().manual_seed(0),
        ).images

    before = draw("latent")
    handle = hooks.attach(pipe.transformer, strong_tokens(bb))
    batches = []
    probe = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(len(a[0] if a else kw["hidden_states"])), with_kwargs=True
    )
    with_tokens, image = draw("latent"), draw("pt")
    ours = sampler.sample_loop(
        bb,
        sampler.initial_noise(models.latent_shape(bb, 64), [0]),
        models.encode_prompts(bb, ["a red cube"]),
        None,
        steps,
        cfg,
        handle,
    )
    our_image = (sampler.generate(bb, ["a red cube"], [0], steps, cfg, 64, handle) + 1) / 2
    probe.remove()
    handle.remove()
    stock_latents = pipe._unpack_latents(with_tokens, 64, 64, pipe.vae_scale_factor)
    if family == "flux-schnell":
        assert torch.equal(ours, stock_latents)
    torch.testing.assert_close(ours, stock_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_image, image, rtol=0, atol=1e-5)
    assert (with_tokens - before).abs().max() > 1e-2 and set(batches) == {1}
    assert torch.equal(draw("latent"), before)


@pytest.mark.parametrize("family", FLUX)
def test_one_agsm_step_and_per_row_sets_on_the_packed_path(family):
    """A random test-size backbone, text features of the family's shapes: rows without tokens give the plain
    model through models.denoise, and one AGSM step (psi+ / psi- per row, the EMA pass) moves the tokens."""
    bb = models.random_backbone(family, "test")
    tokens, batch, x0, cond, x_t, timesteps = agsm_inputs(bb)
    with torch.no_grad():
        plain = models.denoise(bb, x_t, timesteps, cond)
        handle = hooks.attach(bb.denoiser, tokens.sets)
        with handle.rows(torch.tensor([softtokens.POS, -1])):
            mixed = models.denoise(bb, x_t, timesteps, cond)
    assert torch.equal(mixed[1], plain[1]) and (mixed[0] - plain[0]).abs().max() > 1e-3
    before = {k: v.clone() for k, v in tokens.state_dict().items()}
    stats = one_agsm_step(bb, tokens, handle, batch)
    handle.remove()
    assert not stats.get("diverged")
    for name in ("pos", "neg"):  # psi+ learnt on the matched pairs, psi- on the others
        assert not torch.equal(before[f"{name}.tokens"], getattr(tokens, name).tokens), name


def test_gradient_checkpointing_gives_the_same_token_gradients():
    """FLUX's checkpointed blocks are called positionally and recomputed in backward after a later (EMA)
    forward: the hooks must give them the tokens of their own forward."""
    grads = []
    for checkpointing in (False, True):
        bb = models.random_backbone("flux-dev", "test")
        if checkpointing:
            bb.denoiser.enable_gradient_checkpointing()
        bb.denoiser.train()
        pair = softtokens.make_tokens(bb, "agsm", layers=2)
        with torch.no_grad():
            pair.ema_pos.tokens.normal_()
        handle = hooks.attach(bb.denoiser, pair.sets)
        x0, cond = step.encode_batch(bb, bench.random_batch(bb, 4, 32))
        x_t, timesteps, target = step.draw_noise(bb, x0, 0, 0, 0)
        with handle.rows(torch.tensor([0, 1, 1, 0])):
            out = models.denoise(bb, x_t, timesteps, cond)
        with torch.no_grad(), handle.rows(torch.tensor([2, 3, 3, 2])):
            models.denoise(bb, x_t, timesteps, cond)
        (out - target).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pair.trainable()]))
        handle.remove()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[0].abs().sum() > 0


def test_neg_uncond_on_flux_dev_is_one_line(stock, folders, tmp_path):
    """flux-dev has no unconditional branch for psi-: sample.py --neg-uncond fails in one line."""
    path = str(tmp_path / "agsm.safetensors")
    pair = softtokens.make_tokens(stock["flux-dev"], "agsm")
    softtokens.save(path, pair, model="flux-dev", loss="agsm", arch="mmdit")
    with pytest.raises(SystemExit) as err:
        sample.main(
            [
                "--model",
                "flux-dev",
                "--pretrained",
                folders["flux-dev"],
                "--size",
                "64",
                "--steps",
                "1",
                "--tokens",
                path,
                "--neg-uncond",
                "--prompt",
                "a red cube",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert "\n" not in str(err.value) and "--neg-uncond" in str(err.value) and "guidance-distilled" in str(err.value)


def test_sizes_are_multiples_of_16_with_no_positional_table():
    for family in FLUX:
        families.check_size(family, 2048, 1536)
        with pytest.raises(SystemExit, match="multiples of 16"):
            families.check_size(family, 1000)


def test_the_memory_model_counts_both_block_types_over_packed_tokens():
    """shapes.bench's FLUX-dev rows (computed): 19 + 38 blocks of SD3's k, (S/16)^2 packed tokens + 512 T5
    positions + the tokens, width 3072; and --memory-check's positions of a loaded FLUX backbone."""
    per_pair = bench.MMDIT_K[False] * (19 + 38) * ((1024 // 16) ** 2 + 512 + 4) * 3072 * 2
    assert bench.activation_bytes_per_pair("flux-dev", 1024, False) == per_pair
    assert bench.positions(models.random_backbone("flux-schnell", "test"), 64) == (64 // 16) ** 2 + 256 + 4
