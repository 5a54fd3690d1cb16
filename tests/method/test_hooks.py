"""hooks.py: attach / remove, SoftREPA Alg. 1 on the MM-DiT, UNet placement after BOS, per-row sets,
gradients, gradient checkpointing and low precision. Test-size random-weight denoisers of each family."""

import pytest
import tolerances
import torch

import families
import hooks
import models
import softtokens

FAMILIES = ["sd3", "sd1.5", "sdxl", "sd3.5-medium", "sd3.5-large"]
MMDIT = [f for f in FAMILIES if families.FAMILIES[f]["arch"] == "mmdit"]  # SD3.5-Medium: dual attention, QK-norm


def inputs(family, batch=4, seed=0, n_text=7):
    g = torch.Generator().manual_seed(seed)
    width, pooled = models.text_widths(models.denoiser_config(family, "test"))  # the test-size config's widths
    x = torch.randn(batch, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(batch, n_text, width, generator=g)}
    if families.FAMILIES[family]["arch"] == "mmdit":
        cond["pooled_projections"] = torch.randn(batch, pooled, generator=g)
    if family == "sdxl":
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    t = torch.tensor([3.0, 250.0, 999.0, 1000.0])[:batch]
    return x, t, cond


def run(model, x, t, cond):
    with torch.no_grad():
        return model(x, timestep=t, **cond, return_dict=False)[0]


def random_tokens(model, layers, n_tokens=3, seed=0, time_table=True):
    torch.manual_seed(seed)
    s = softtokens.SoftTokens(layers, n_tokens, hooks.token_width(model), time_table)
    s.tokens.data.normal_(0, 1)
    if time_table:
        s.time_table.data.normal_(0, 0.5)
    return s


def layers_for(family):
    return 2 if families.FAMILIES[family]["arch"] == "mmdit" else 1


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bitwise(family):
    model = models.random_denoiser(family, "test")
    x, t, cond = inputs(family)
    before = run(model, x, t, cond)
    everywhere = None if hooks.is_mmdit(model) else {"groups": ["down", "mid", "up"]}
    handle = hooks.attach(model, random_tokens(model, layers_for(family)), everywhere)
    with_tokens = run(model, x, t, cond)
    handle.remove()
    after = run(model, x, t, cond)
    assert not torch.allclose(with_tokens, before, atol=1e-4)
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not model._forward_hooks


# ---------------------------------------------------------------------------------------------
# MM-DiT: SoftREPA Algorithm 1


def reference_mmdit(model, x, t, cond, tokens):
    """Alg. 1 written out: blocks called one by one with explicit concatenation and cut."""
    height, width = x.shape[-2:]
    image = model.pos_embed(x)
    temb = model.time_text_embed(t, cond["pooled_projections"])
    text = model.context_embedder(cond["encoder_hidden_states"])
    n = text.shape[1]
    per_layer = tokens(t)  # (B, L, m, d)
    for k, block in enumerate(model.transformer_blocks):
        if k < per_layer.shape[1]:
            text = torch.cat([per_layer[:, k], text], dim=1)  # line 8
        text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
        if text is not None:
            text = text[:, -n:]  # line 13
    image = model.proj_out(model.norm_out(image, temb))
    p = model.config.patch_size
    image = image.reshape(x.shape[0], height // p, width // p, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", image).reshape(x.shape[0], model.out_channels, height, width)


@pytest.mark.parametrize("family", MMDIT)
@pytest.mark.parametrize("time_table", [True, False])
def test_mmdit_matches_handwritten_algorithm_1(family, time_table):
    """SD3, and SD3.5 with dual attention (Medium) and QK-norm: the hooked stock model against Alg. 1
    written out block by block, with and without the time table."""
    model = models.random_denoiser(family, "test")
    x, t, cond = inputs(family)
    tokens = random_tokens(model, 3, time_table=time_table)
    handle = hooks.attach(model, tokens)
    hooked = run(model, x, t, cond)
    handle.remove()
    with torch.no_grad():
        reference = reference_mmdit(model, x, t, cond, tokens)
    torch.testing.assert_close(hooked, reference, **tolerances.REORDERED_FP32)
    print(f"{family}: max |hooked - Alg. 1| = {(hooked - reference).abs().max().item():.3g}")


def test_mmdit_each_layer_token_matters_and_streams_keep_length():
    model = models.random_denoiser("sd3", "test")
    x, t, cond = inputs("sd3")
    tokens = random_tokens(model, 3)
    lengths_in, lengths_out = [], []
    probes = []
    for block in model.transformer_blocks:
        probes.append(
            block.register_forward_pre_hook(
                lambda mod, args, kwargs: lengths_in.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
            )
        )
    handle = hooks.attach(model, tokens)
    for block in model.transformer_blocks:  # registered after attach: sees the cut output
        probes.append(
            block.register_forward_hook(
                lambda mod, args, out: lengths_out.append(None if out[0] is None else out[0].shape[1])
            )
        )
    base = run(model, x, t, cond)
    n = cond["encoder_hidden_states"].shape[1]
    # the probes registered before attach see the stream before our prepend: n at every block
    assert lengths_in == [n] * len(model.transformer_blocks)
    last = model.transformer_blocks[-1].context_pre_only
    assert lengths_out == [n] * (len(model.transformer_blocks) - 1) + [None if last else n]
    for k in range(3):
        # a random change (a constant shift would vanish in the block's LayerNorm)
        change = torch.randn_like(tokens.tokens[k])
        with torch.no_grad():
            tokens.tokens[k] += change
        assert not torch.allclose(run(model, x, t, cond), base, atol=1e-5), f"layer {k} tokens had no effect"
        with torch.no_grad():
            tokens.tokens[k] -= change
    for p in probes:
        p.remove()
    handle.remove()


def test_mmdit_blocks_past_L_see_no_tokens():
    """Tokens for layers >= L do not exist: with L = 2 the third block's input is the plain stream."""
    model = models.random_denoiser("sd3", "test")
    x, t, cond = inputs("sd3")
    seen = {}
    handle = hooks.attach(model, random_tokens(model, 2))

    def record(k):
        def hook(module, args, kwargs):
            seen[k] = kwargs["encoder_hidden_states"].shape[1]

        return hook

    for k, block in enumerate(model.transformer_blocks):  # after attach: sees what the block computes on
        block.register_forward_pre_hook(record(k), with_kwargs=True)
    run(model, x, t, cond)
    n = cond["encoder_hidden_states"].shape[1]
    assert seen == {0: n + 3, 1: n + 3, 2: n, 3: n, 4: n, 5: n}
    handle.remove()
    with pytest.raises(ValueError, match="need 7 blocks"):
        hooks.attach(model, random_tokens(model, 7))


# ---------------------------------------------------------------------------------------------
# UNet: tokens right after BOS in the chosen blocks' cross-attention


@pytest.mark.parametrize("family,where", [("sd1.5", ("down",)), ("sdxl", ("down", "mid")), ("sd1.5", ("up",))])
def test_unet_placement_after_bos(family, where):
    model = models.random_denoiser(family, "test")
    x, t, cond = inputs(family)
    tokens = random_tokens(model, 1)
    handle = hooks.attach(model, tokens, {"groups": where})
    chosen = {id(b) for b in hooks.unet_blocks(model, where)}
    seen = []
    for part in (model.down_blocks, [model.mid_block], model.up_blocks):
        for block in part:
            for name, mod in block.named_modules():
                if name.endswith("attn2"):
                    mod.register_forward_pre_hook(
                        lambda m, args, kwargs, inside=id(block) in chosen: seen.append(
                            (inside, kwargs["encoder_hidden_states"])
                        ),
                        with_kwargs=True,
                    )
    run(model, x, t, cond)
    handle.remove()
    text = cond["encoder_hidden_states"]
    n, m = text.shape[1], 3
    expected_tokens = tokens(t).squeeze(1)  # (B, m, d)
    assert any(inside for inside, _ in seen) and any(not inside for inside, _ in seen)
    for inside, seq in seen:
        if inside:
            assert seq.shape[1] == n + m
            torch.testing.assert_close(seq[:, :1], text[:, :1])  # BOS first
            torch.testing.assert_close(seq[:, 1 : 1 + m], expected_tokens)  # then the soft tokens
            torch.testing.assert_close(seq[:, 1 + m :], text[:, 1:])  # then the rest
        else:
            assert seq.shape[1] == n
            torch.testing.assert_close(seq, text)


def test_unet_layer_count_must_fit_blocks():
    model = models.random_denoiser("sdxl", "test")
    with pytest.raises(ValueError, match="use 1 \\(shared\\)"):
        hooks.attach(model, random_tokens(model, 5), {"groups": ("down", "mid")})


# ---------------------------------------------------------------------------------------------
# Per-row token sets in one batched forward


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_rows_equal_separate_forwards(family):
    model = models.random_denoiser(family, "test")
    x, t, cond = inputs(family)
    pair = softtokens.PairTokens(layers_for(family), 3, hooks.token_width(model))
    for i, s in enumerate(pair.sets):  # four different sets
        torch.manual_seed(i)
        s.tokens.data.normal_(0, 1)
        s.time_table.data.normal_(0, 0.5)
    plain = run(model, x, t, cond)
    handle = hooks.attach(model, pair.sets, None if hooks.is_mmdit(model) else {"groups": ("down", "mid")})
    choice = torch.tensor([softtokens.POS, softtokens.NEG, softtokens.EMA_POS, -1])
    with handle.rows(choice):
        mixed = run(model, x, t, cond)
    separate = []
    for set_index in choice.tolist():
        with handle.rows(torch.full((4,), set_index)):
            separate.append(run(model, x, t, cond))
    handle.remove()
    for row in range(len(choice)):
        torch.testing.assert_close(mixed[row], separate[row][row], **tolerances.REORDERED_FP32)
    torch.testing.assert_close(mixed[3], plain[3], **tolerances.REORDERED_FP32)  # the no-token row
    assert not torch.allclose(mixed[0], plain[0], atol=1e-4)


def test_choice_length_must_match_batch():
    model = models.random_denoiser("sd1.5", "test")
    x, t, cond = inputs("sd1.5")
    handle = hooks.attach(model, random_tokens(model, 1))
    with handle.rows(torch.zeros(3, dtype=torch.long)), pytest.raises(ValueError, match="3 rows but the batch has 4"):
        run(model, x, t, cond)


def test_width_mismatch_is_one_line_naming_both_shapes():
    model = models.random_denoiser("sd3", "test")
    wrong = softtokens.SoftTokens(5, 4, 1536)
    with pytest.raises(ValueError) as err:
        hooks.attach(model, wrong)
    message = str(err.value)
    assert "\n" not in message and "(5, 4, 1536)" in message and "32" in message


# ---------------------------------------------------------------------------------------------
# Gradients: only the soft tokens learn; checkpointing and precision


@pytest.mark.parametrize("family", ["sd3", "sd1.5"])
def test_only_soft_tokens_get_gradients(family):
    model = models.random_denoiser(family, "test").requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(model, layers_for(family))
    handle = hooks.attach(model, tokens)
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-2)
    x, t, cond = inputs(family)
    start = tokens.tokens.detach().clone()
    model(x, timestep=t, **cond, return_dict=False)[0].square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert tokens.tokens.grad is not None and tokens.tokens.grad.abs().sum() > 0
    assert tokens.time_table.grad.abs().sum() > 0
    opt.step()
    handle.remove()
    assert not torch.equal(tokens.tokens.detach(), start)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ["sd3", "sd1.5"])
def test_gradient_checkpointing_gives_same_gradients(family):
    """With checkpointing, blocks are recomputed during backward, after later forwards (AGSM's EMA pass);
    the recomputation must use the tokens of its own forward."""
    grads = []
    for checkpointing in (False, True):
        model = models.random_denoiser(family, "test").requires_grad_(False)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(1)
        pair = softtokens.PairTokens(layers_for(family), 3, hooks.token_width(model))
        pair.ema_pos.tokens.data.normal_(0, 1)
        handle = hooks.attach(model, pair.sets)
        x, t, cond = inputs(family)
        with handle.rows(torch.tensor([0, 1, 1, 0])):
            out = model(x, timestep=t, **cond, return_dict=False)[0]
        with torch.no_grad(), handle.rows(torch.tensor([2, 3, 3, 2])):
            model(x, timestep=t, **cond, return_dict=False)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pair.trainable()]))
        handle.remove()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("family", ["sd3", "sd1.5"])
def test_bf16_model_with_fp32_tokens(family):
    model = models.random_denoiser(family, "test").to(torch.bfloat16)
    x, t, cond = inputs(family)
    cond = {k: v.to(torch.bfloat16) for k, v in cond.items()}
    tokens = random_tokens(model, layers_for(family))
    handle = hooks.attach(model, tokens)
    out = model(x.to(torch.bfloat16), timestep=t, **cond, return_dict=False)[0]
    out.float().square().mean().backward()
    handle.remove()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert tokens.tokens.grad.dtype == torch.float32 and tokens.tokens.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The stock pipelines: tokens act through the pipeline's own calls and CFG batch, and come off


@pytest.mark.parametrize("family", ["sd1.5", "sdxl"])
def test_stock_unet_pipelines_with_tokens(tmp_path, family):
    import tiny_pipelines

    pipe = (tiny_pipelines.sd15_pipeline if family == "sd1.5" else tiny_pipelines.sdxl_pipeline)(tmp_path)

    def draw():
        return pipe(
            "a red cube",
            num_inference_steps=2,
            guidance_scale=7.0,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    before = draw()
    tokens = random_tokens(pipe.unet, 1, n_tokens=4)
    handle = hooks.attach(pipe.unet, tokens, {"groups": families.FAMILIES[family]["token_blocks"]})
    with_tokens = draw()
    handle.remove()
    after = draw()
    assert (with_tokens - before).abs().max() > 1e-5
    assert torch.equal(after, before)


def test_tokens_for_rows_zeroes_unused_rows():
    sets = [softtokens.SoftTokens(1, 2, 4) for _ in range(2)]
    t = torch.tensor([10.0, 20.0, 30.0])
    tokens, used = hooks.tokens_for_rows(sets, t, torch.tensor([1, -1, 0]))
    torch.testing.assert_close(tokens[0], sets[1](t)[0])
    torch.testing.assert_close(tokens[2], sets[0](t)[2])
    assert used.tolist() == [True, False, True] and tokens[1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# FLUX (FluxTransformer2DModel): the same MM-DiT path, with rotary positions and single-stream blocks.
# The families' test-size models: flux-dev with its guidance embedding, flux-schnell without.

FLUX = ["flux-dev", "flux-schnell"]


def flux_inputs(model, batch=4, n=5, side=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, side * side, model.config.in_channels, generator=g)  # packed latents
    ctx = torch.randn(batch, n, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=g)
    sigma = torch.tensor([0.003, 0.25, 0.999, 1.0])[:batch]
    guidance = torch.full((batch,), 3.5) if model.config.guidance_embeds else None
    txt_ids, img_ids = torch.zeros(n, 3), torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    return dict(
        hidden_states=x,
        encoder_hidden_states=ctx,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=txt_ids,
        guidance=guidance,
    )


def reference_flux(model, call, tokens):
    """Alg. 1 on FLUX, written out: the first L double-stream blocks get their tokens prepended, with the
    rotary embedding of m more zero ids, and are cut back; the single-stream blocks see the plain text."""
    sigma, n = call["timestep"], call["encoder_hidden_states"].shape[1]
    per = tokens(sigma * 1000)
    L, m = per.shape[1:3]
    image = model.x_embedder(call["hidden_states"])
    guidance = () if call["guidance"] is None else (call["guidance"] * 1000,)
    temb = model.time_text_embed(sigma * 1000, *guidance, call["pooled_projections"])
    text = model.context_embedder(call["encoder_hidden_states"])
    ids = torch.cat([call["txt_ids"], call["img_ids"]])
    rope, rope_m = model.pos_embed(ids), model.pos_embed(torch.cat([ids.new_zeros(m, 3), ids]))
    for k, block in enumerate(model.transformer_blocks):
        if k < L:
            text, image = block(image, torch.cat([per[:, k], text], dim=1), temb, rope_m)
            text = text[:, -n:]
        else:
            text, image = block(image, text, temb, rope)
    for block in model.single_transformer_blocks:
        text, image = block(image, text, temb, rope)
    return model.proj_out(model.norm_out(image, temb))


@pytest.mark.parametrize("family", FLUX)
@pytest.mark.parametrize("layers", [2, 5])  # 5: every double-stream block has tokens
@pytest.mark.parametrize("time_table", [True, False])
def test_flux_matches_handwritten_algorithm_1_and_comes_off_bitwise(family, layers, time_table):
    model = models.random_denoiser(family, "test")
    call = flux_inputs(model)
    tokens = random_tokens(model, layers, time_table=time_table)
    with torch.no_grad():
        plain = model(**call, return_dict=False)[0]
        handle = hooks.attach(model, tokens)
        hooked = model(**call, return_dict=False)[0]
        handle.remove()
        after = model(**call, return_dict=False)[0]
        reference = reference_flux(model, call, tokens)
    torch.testing.assert_close(hooked, reference, **tolerances.REORDERED_FP32)
    assert (hooked - plain).abs().max() > 1e-3 and torch.equal(after, plain)
    assert not model._forward_pre_hooks and not model._forward_hooks
    print(f"{family}: max |hooked - Alg. 1| = {(hooked - reference).abs().max().item():.3g}")


@pytest.mark.parametrize("family", FLUX)
def test_flux_mixed_rows_equal_separate_forwards_and_no_token_rows_are_plain(family):
    model = models.random_denoiser(family, "test")
    call = flux_inputs(model)
    sets = [random_tokens(model, 2, seed=s) for s in range(3)]
    with torch.no_grad():
        plain = model(**call, return_dict=False)[0]
        handle = hooks.attach(model, sets)
        choice = torch.tensor([0, 1, 2, -1])
        with handle.rows(choice):
            mixed = model(**call, return_dict=False)[0]
        separate = []
        for c in choice.tolist():
            with handle.rows(torch.full((4,), c)):
                separate.append(model(**call, return_dict=False)[0])
        handle.remove()
    for r in range(4):
        torch.testing.assert_close(mixed[r], separate[r][r], **tolerances.REORDERED_FP32)
    torch.testing.assert_close(mixed[3], plain[3], **tolerances.REORDERED_FP32)
