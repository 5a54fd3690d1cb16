"""softtokens.py: eq. 12 semantics, the AGSM pair and its EMA, files, and the released SoftREPA tokens."""

import os

import pytest
import torch

import hooks
import models
import softtokens
import trained
from shapes import backbones

RELEASED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "official-softrepa-tokens")
needs_released = pytest.mark.skipif(not os.path.isdir(RELEASED), reason="released SoftREPA tokens not present")


def test_time_bins():
    t = torch.tensor([0.0, 9.99, 10.0, 500.5, 999.0, 1000.0])
    assert softtokens.time_bin(t).tolist() == [0, 0, 1, 50, 99, 99]


def test_forward_adds_the_time_row_to_every_token_of_its_layer():
    s = softtokens.SoftTokens(3, 4, 8)
    s.time_table.data.normal_()
    out = s(torch.tensor([123.0, 7.0]))
    assert out.shape == (2, 3, 4, 8)
    expected = s.tokens + s.time_table[12].unsqueeze(1)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], s.tokens + s.time_table[0].unsqueeze(1))
    no_time = softtokens.SoftTokens(3, 4, 8, time_table=False)
    torch.testing.assert_close(no_time(torch.tensor([5.0]))[0], no_time.tokens)


def test_parameter_count_matches_paper_sd3():
    """SoftREPA: 4 tokens x 5 layers of width 1536 with the time table ~ 0.8-0.9M (AGSM Table 1: 0.9M)."""
    s = softtokens.SoftTokens(5, 4, 1536)
    count = sum(p.numel() for p in s.parameters())
    assert count == 5 * 4 * 1536 + 100 * 5 * 1536 == 798_720
    assert round(count / 1e6, 1) == 0.8


def test_pair_tokens_start_equal_and_ema_moves_toward_live():
    pair = softtokens.PairTokens(2, 3, 8)
    torch.testing.assert_close(pair.ema_pos.tokens, pair.pos.tokens)
    torch.testing.assert_close(pair.ema_neg.tokens, pair.neg.tokens)
    assert not torch.equal(pair.pos.tokens, pair.neg.tokens)  # two N(0, 0.02) draws, as the AGSM code
    same = softtokens.PairTokens(2, 3, 8, init_tokens=torch.ones(3, 8))  # SD1.5: both from the BOS vector
    torch.testing.assert_close(same.neg.tokens, same.pos.tokens)
    assert all(not p.requires_grad for p in pair.ema_pos.parameters())
    assert len(pair.trainable()) == 3  # psi+ tokens, psi- tokens, their one shared time table
    with torch.no_grad():
        pair.pos.tokens += 1.0
        pair.pos.time_table += 1.0
    old, old_table = pair.ema_pos.tokens.clone(), pair.ema_pos.time_table.clone()
    pair.update_ema(0.9)
    torch.testing.assert_close(pair.ema_pos.tokens, old + 0.1)
    torch.testing.assert_close(pair.ema_pos.time_table, old_table + 0.1)  # updated once, not twice
    torch.testing.assert_close(pair.ema_neg.tokens, pair.neg.tokens)


def test_psi_plus_and_minus_share_one_time_table():
    """The AGSM code's layout (transformer.py: soft_tokens (2, L, m, d) and ONE soft_t_tokens table):
    a gradient through psi- rows alone trains the time rows psi+ uses."""
    pair = softtokens.PairTokens(2, 3, 8)
    assert pair.pos.time_table is pair.neg.time_table and pair.ema_pos.time_table is pair.ema_neg.time_table
    t = torch.tensor([150.0, 700.0])
    pair.neg(t).pow(2).sum().backward()
    assert pair.pos.time_table.grad is not None and pair.pos.time_table.grad[[15, 70]].abs().sum() > 0
    assert pair.pos.tokens.grad is None


def test_time_table_starts_random_like_the_authors_embedding():
    torch.manual_seed(0)
    table = softtokens.SoftTokens(2, 3, 64).time_table
    assert 0.015 < table.std().item() < 0.025 and table.abs().sum() > 0  # N(0, 0.02), not zeros


def test_uncond_init_copies_the_empty_prompt_bos_vector():
    """SD1.5 init of both codes: the BOS state of "" copied m times (the released SoftREPA SD1.5 tokens
    are four identical vectors)."""
    bb = backbones.build_tiny("tiny-sd1.5")
    s = softtokens.make_tokens(bb, "softrepa")
    hidden = models.encode_prompts(bb, [""])["encoder_hidden_states"][0]
    assert s.shape == (1, 4, 128)
    torch.testing.assert_close(s.tokens[0], hidden[:1].expand(4, -1))


def test_released_softrepa_sd15_tokens_are_identical_vectors():
    folder = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "..",
        "shared",
        "official-softrepa-tokens",
        "sd1.5",
    )
    if not os.path.isdir(folder):
        pytest.skip("released SoftREPA tokens not present")
    tokens = softtokens.import_softrepa(folder).tokens[0]
    # after training they are no longer exactly equal, but far closer to each other than to zero
    spread = (tokens - tokens.mean(0)).norm(dim=1).max() / tokens.norm(dim=1).mean()
    assert spread < 0.5, spread


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-sd1.5"])
def test_agsm_release_format_imports_and_gives_the_same_outputs(tmp_path, family):
    """checkpoints/<family>/soft_tokens.pth: one tensor (2, L, m, d) -- (2, m, d) for the UNet -- and
    soft_t_tokens.pth: an nn.Embedding(100, L * d), written here exactly so and imported back."""
    bb = backbones.build_tiny(family)
    pair = softtokens.make_tokens(bb, "agsm")
    with torch.no_grad():
        for p in pair.parameters():
            p.normal_()
    L, m, d = pair.pos.shape
    released = torch.stack([pair.pos.tokens.detach(), pair.neg.tokens.detach()])
    torch.save(released.squeeze(1) if bb.facts["arch"] == "unet" else released, tmp_path / "soft_tokens.pth")
    table = torch.nn.Embedding(softtokens.TIME_BINS, L * d)
    table.weight.data.copy_(pair.pos.time_table.detach().reshape(softtokens.TIME_BINS, L * d))
    torch.save(table, tmp_path / "soft_t_tokens.pth")
    imported = softtokens.import_agsm(str(tmp_path))
    x = torch.randn(2, *models.latent_shape(bb, 16))
    cond = models.encode_prompts(bb, ["a red circle", "two blue squares"])
    outputs = []
    for tokens in (pair, imported):
        for which in (softtokens.POS, softtokens.NEG):
            handle = softtokens.attach_tokens(bb, tokens.sets)
            try:
                with torch.no_grad(), handle.rows(torch.full((2,), which)):
                    outputs.append(models.denoise(bb, x, torch.tensor([100.0, 900.0]), cond))
            finally:
                handle.remove()
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    assert not torch.equal(outputs[0], outputs[1])  # psi+ and psi- differ


def test_agsm_import_refuses_code_in_the_pickle(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    torch.save({"x": Payload()}, tmp_path / "soft_tokens.pth")
    with pytest.raises(SystemExit) as e:
        softtokens.import_agsm(str(tmp_path))
    assert (
        "refused, its pickle asks for" in str(e.value)
        and "weights_only" not in str(e.value)
        and "\n" not in str(e.value)
    )
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
def test_save_load_roundtrip_with_metadata(tmp_path, loss):
    bb = backbones.build_tiny("tiny-sd3")
    tokens = softtokens.make_tokens(bb, loss)
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_()
    path = tmp_path / "tokens.safetensors"
    softtokens.save(str(path), tokens, model="tiny-sd3", loss=loss)
    loaded, meta = softtokens.load(str(path))
    assert meta["model"] == "tiny-sd3" and meta["loss"] == loss
    assert (meta["layers"], meta["n_tokens"], meta["width"], meta["time_bins"]) == (2, 4, 128, 100)
    assert type(loaded) is type(tokens)
    for a, b in zip(loaded.state_dict().values(), tokens.state_dict().values()):
        torch.testing.assert_close(a, b)
    if loss == "agsm":
        pos, _ = softtokens.load(str(path), which="pos")
        torch.testing.assert_close(pos.tokens, tokens.pos.tokens)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_load_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="not a soft-token file"):
        softtokens.load(str(tmp_path / "other.safetensors"))


# ---------------------------------------------------------------------------------------------
# The authors' released tokens


@needs_released
@pytest.mark.parametrize(
    "family,shape,has_time", [("sd3", (5, 4, 1536), True), ("sd1.5", (1, 4, 768), True), ("sdxl", (1, 4, 2048), False)]
)
def test_import_released_shapes(family, shape, has_time):
    s = softtokens.import_softrepa(os.path.join(RELEASED, family))
    assert s.shape == shape
    assert (s.time_table is not None) == has_time


@needs_released
def test_import_released_sd3_time_rows_are_per_layer_chunks():
    s = softtokens.import_softrepa(os.path.join(RELEASED, "sd3"))
    with torch.serialization.safe_globals([torch.nn.Embedding]):
        table = torch.load(
            os.path.join(RELEASED, "sd3", "dc_t_tokens.pth"), map_location="cpu", weights_only=True
        ).weight
    out = s(torch.tensor([437.0]))[0]  # bin 43
    for k in range(5):
        torch.testing.assert_close(out[k], s.tokens[k] + table[43, k * 1536 : (k + 1) * 1536])


def sd3_shaped_model():
    """An SD3-shaped MM-DiT (text stream 1536 wide, 6 blocks so that 5 carry tokens) with random weights.
    Built on the meta device and filled in place: a normal construction would spend seconds on init."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=32,
            caption_projection_dim=1536,
            pooled_projection_dim=16,
            pos_embed_max_size=4,
        )
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
        for name, b in model.named_buffers():  # positional embedding: recompute (it is not random)
            if name.endswith("pos_embed.pos_embed"):
                from diffusers.models.embeddings import get_2d_sincos_pos_embed

                b.copy_(
                    torch.as_tensor(
                        get_2d_sincos_pos_embed(1536, 4, base_size=2, interpolation_scale=1.0, output_type="pt")
                    )
                    .float()
                    .unsqueeze(0)
                )
    return model.eval()


@needs_released
def test_released_tokens_change_sd3_shaped_and_sd15_shaped_outputs():
    sd3 = softtokens.import_softrepa(os.path.join(RELEASED, "sd3"))
    model = sd3_shaped_model()
    x = torch.randn(1, 4, 4, 4)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 32), "pooled_projections": torch.randn(1, 16)}
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = model(x, timestep=t, **cond, return_dict=False)[0]
        handle = hooks.attach(model, sd3)
        tuned = model(x, timestep=t, **cond, return_dict=False)[0]
        handle.remove()
    assert not torch.allclose(base, tuned, atol=1e-4)
    del model

    sd15 = softtokens.import_softrepa(os.path.join(RELEASED, "sd1.5"))
    unet = models.random_denoiser("sd1.5", "test", cross_attention_dim=768)
    cond = {"encoder_hidden_states": torch.randn(1, 7, 768)}
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        base = unet(x, timestep=t, **cond, return_dict=False)[0]
        handle = hooks.attach(unet, sd15, {"groups": ("down",)})
        tuned = unet(x, timestep=t, **cond, return_dict=False)[0]
        handle.remove()
    assert not torch.allclose(base, tuned, atol=1e-4)


def test_a_file_carries_its_placement_and_one_the_code_cannot_honour_is_refused(tmp_path):
    bb = backbones.build_tiny("tiny-sd3")
    tokens = softtokens.SoftTokens(2, 4, hooks.token_width(bb.denoiser))
    path = str(tmp_path / "tokens.safetensors")
    softtokens.save(path, tokens, model="tiny-sd3", placement={"blocks": [1, 3]})
    with trained.attached(bb, trained.read(path, "tiny-sd3")) as handle:
        assert handle.placement == {"blocks": [1, 3]}  # where the file says, not the first two blocks
    softtokens.save(path, tokens, model="tiny-sd3", placement={"blocks": [0, 1], "stride": 2})
    with pytest.raises(SystemExit, match="placement \\['stride'\\] is not one this code can honour") as e:
        trained.attach(bb, trained.read(path, "tiny-sd3"))
    assert "\n" not in str(e.value)


def test_tokens_that_do_not_fit_fail_in_one_line():
    bb = backbones.build_tiny("tiny-sd3")
    with pytest.raises(SystemExit, match="cannot attach these tokens to tiny-sd3"):
        trained.attach(bb, trained.of_tokens([softtokens.SoftTokens(2, 4, 64)]))


@pytest.mark.skipif(not os.path.isdir(RELEASED), reason="released SoftREPA tokens not present")
def test_released_softrepa_folder_reads():
    loaded = trained.read(os.path.join(RELEASED, "sd3"), "sd3")
    (sd3,) = loaded.sets
    assert sd3.shape == (5, 4, 1536) and sd3.time_table is not None and loaded.token_set == "softrepa"
    (sdxl,) = trained.read(os.path.join(RELEASED, "sdxl"), "sdxl").sets
    assert sdxl.shape == (1, 4, 2048) and sdxl.time_table is None
    with pytest.raises(SystemExit, match="pair-token file"):
        trained.read(os.path.join(RELEASED, "sd1.5"), "sd1.5", neg_uncond=True)


def test_a_released_file_that_is_no_tensor_is_a_one_line_error(tmp_path):
    (tmp_path / "dc_tokens.pth").write_bytes(b"\x80\x02]q\x00(K\x01K\x02e.")  # a pickled list, not a torch file
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        softtokens.import_softrepa(str(tmp_path))
    torch.save({"tokens": torch.ones(2)}, tmp_path / "dc_tokens.pth")
    with pytest.raises(SystemExit, match="holds a dict, not a tensor"):
        softtokens.import_softrepa(str(tmp_path))
