"""models.py: the family table, noising and targets against their formulas, prompt encoding, errors."""

import pytest
import torch

import families
import models
import recipe
import sampler
from shapes import backbones


def test_every_family_has_the_same_facts():
    keys = set(families.FAMILIES["sd3"])
    for name, facts in families.FAMILIES.items():
        assert set(facts) == keys, name
        assert facts["arch"] in ("mmdit", "unet") and facts["prediction"] in ("flow", "epsilon")


def test_paper_defaults():
    f = families.FAMILIES
    assert (f["sd3"]["n_tokens"], f["sd3"]["token_layers"], f["sd3"]["time_table"]) == (4, 5, True)
    assert f["sdxl"]["token_blocks"] == ("down", "mid") and not f["sdxl"]["time_table"]
    assert f["sd1.5"]["init"] == "uncond" and f["sd1.5"]["token_blocks"] == ("down",)
    assert (f["sd3"]["agsm"]["gamma_pos"], f["sd3"]["agsm"]["gamma_neg"]) == (1.0, 0.1)
    assert f["sd3"]["softrepa"]["dweight"] == 0.0 and f["sd1.5"]["softrepa"]["dweight"] == 10.0


def test_unknown_model_is_one_line():
    with pytest.raises(SystemExit, match="unknown model 'sd4': choose one of"):
        models.check_name("sd4")


def test_missing_tiny_weights_say_how_to_rebuild(tmp_path):
    with pytest.raises(SystemExit, match="python -m shapes.pretrain --model tiny-sd3"):
        backbones.load("tiny-sd3", pretrained=str(tmp_path))


def test_offline_hub_model_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as err:
        models.load("sd1.5")
    message = str(err.value)
    assert "\n" not in message and "--pretrained" in message and "hf auth login" in message


def test_ddpm_noising_formula():
    bb = backbones.build_tiny("tiny-sd1.5")
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t = models.add_noise(bb, x0, noise, torch.tensor([0.0, 0.5]))
    assert t.tolist() == [0, 500]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.prod(1 - betas[:501]).float()
    torch.testing.assert_close(x_t[1], abar.sqrt() * x0[1] + (1 - abar).sqrt() * noise[1])
    assert models.target(bb, x0, noise) is noise


def test_flow_noising_formula():
    bb = backbones.build_tiny("tiny-sd3")
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t = models.add_noise(bb, x0, noise, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(t, torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(models.target(bb, x0, noise), noise - x0)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_encode_and_denoise_tiny(name):
    bb = backbones.build_tiny(name)
    cond = models.encode_prompts(bb, ["a red circle", ""])
    assert cond["encoder_hidden_states"].shape[:2] == (2, 16)
    assert ("pooled_projections" in cond) == (name == "tiny-sd3")
    assert not cond["encoder_hidden_states"].requires_grad
    x = torch.randn(2, *models.latent_shape(bb))
    out = models.denoise(bb, x, torch.tensor([100.0, 900.0]), cond)
    assert out.shape == x.shape


def test_index_and_cat_conds_handle_nested_dicts():
    cond = {
        "encoder_hidden_states": torch.arange(6).view(3, 2),
        "added_cond_kwargs": {"time_ids": torch.arange(3).view(3, 1)},
    }
    picked = models.index_cond(cond, torch.tensor([2, 0, 2]))
    assert picked["encoder_hidden_states"][:, 0].tolist() == [4, 0, 4]
    assert picked["added_cond_kwargs"]["time_ids"].flatten().tolist() == [2, 0, 2]
    both = models.cat_conds([cond, picked])
    assert both["added_cond_kwargs"]["time_ids"].shape == (6, 1)


def test_random_init_backbone_moves_every_module():
    """--random-init builds on the CPU in fp32 and then moves the backbone: the autoencoder too (on CUDA
    a VAE left behind fails at the first encode; here the dtype shows it)."""
    bb = backbones.load("tiny-sd3", random_init=True).to("cpu", torch.bfloat16)
    assert {m.dtype for m in (bb.denoiser, bb.text_encoder, bb.vae)} == {torch.bfloat16}


# A backbone family is one entry of families.FAMILIES: a made-up MM-DiT and a made-up UNet, registered
# here and nowhere else, go through the real code path (random weights at their "real" size, text
# features of their shapes, tokens attached, one AGSM training step, sampling) without another edit.
TOY_FAMILIES = {
    "toy-dit": dict(
        families.FAMILIES["sd3"],
        hub="example/toy-dit",
        size=64,
        vae_factor=8,
        size_multiple=16,
        max_size=128,
        n_tokens=3,
        token_layers=2,
        text_tokens=9,
        test_denoiser=None,
        denoiser=dict(
            sample_size=8,
            patch_size=2,
            in_channels=8,
            out_channels=8,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=3,
            joint_attention_dim=40,
            caption_projection_dim=24,
            pooled_projection_dim=12,
            pos_embed_max_size=8,
        ),
    ),
    "toy-unet": dict(
        families.FAMILIES["sd1.5"],
        hub="example/toy-unet",
        size=64,
        vae_factor=8,
        size_multiple=16,
        n_tokens=2,
        init="normal",
        text_tokens=11,
        test_denoiser=None,
        denoiser=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=20,
            attention_head_dim=2,
            norm_num_groups=4,
        ),
    ),
}


def agsm_inputs(bb):
    """AGSM tokens with a random psi+ and a random batch of the family's shapes, noised as a step noises it:
    (tokens, batch, x0, cond, x_t, timesteps)."""
    import softtokens
    import step
    from shapes import bench

    tokens = softtokens.make_tokens(bb, "agsm")
    with torch.no_grad():
        tokens.pos.tokens.normal_()
    batch = bench.random_batch(bb, 2, 64)
    x0, cond = step.encode_batch(bb, batch)
    x_t, timesteps, _ = step.draw_noise(bb, x0, 0, 0, 0)
    return tokens, batch, x0, cond, x_t, timesteps


def one_agsm_step(bb, tokens, handle, batch):
    """step.train_step once with AGSM's recipe for the family; returns its stats."""
    from types import SimpleNamespace

    import step

    settings = SimpleNamespace(**recipe.defaults(bb.name, "agsm", steps=10))
    opt = torch.optim.AdamW(tokens.trainable(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return step.train_step(
        bb, tokens, handle, opt, sched, torch.amp.GradScaler("cpu", enabled=False), settings, batch, 0
    )


@pytest.mark.parametrize("name", list(TOY_FAMILIES))
def test_a_new_family_is_one_table_entry(monkeypatch, name):
    import softtokens

    monkeypatch.setitem(families.FAMILIES, name, TOY_FAMILIES[name])
    bb = backbones.random_backbone(name)
    assert models.feature_shapes(name)[1] == (
        TOY_FAMILIES[name]["text_tokens"],
        models.text_widths(bb.denoiser.config)[0],
    )
    tokens, batch, x0, cond, x_t, timesteps = agsm_inputs(bb)
    handle = softtokens.attach_tokens(bb, tokens.sets)
    with torch.no_grad():
        with_tokens = models.denoise(bb, x_t, timesteps, cond)
        with handle.rows(torch.full((2,), -1)):
            plain = models.denoise(bb, x_t, timesteps, cond)
    assert with_tokens.shape == x0.shape and (with_tokens - plain).abs().max() > 1e-4
    before = tokens.pos.tokens.detach().clone()
    stats = one_agsm_step(bb, tokens, handle, batch)
    assert not stats.get("diverged") and not torch.equal(before, tokens.pos.tokens)
    x = sampler.sample_loop(
        bb,
        torch.randn(1, *models.latent_shape(bb)),
        models.random_text(bb, 1, 0),
        models.random_text(bb, 1, 1),
        2,
        2.0,
        handle,
    )
    assert x.shape == (1,) + models.latent_shape(bb) and torch.isfinite(x).all()
    handle.remove()
