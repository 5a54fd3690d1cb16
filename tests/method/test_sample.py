# Tests for sample.py: the command line in-process on random tiny backbones (same seed -> same image;
# tokens change the image; no tokens, an empty token file and --no-tokens give the plain model bit for
# bit; psi- / EMA selection), the records eval.py reads, the one-line input errors, and the stock
# diffusers pipeline with hooks (README example). The sampler itself: the samplers against written-out
# loops (Euler on the flow ODE, DDIM), per-row token sets in a guided prediction, and the size facts
# of families.FAMILIES that families.check_size enforces (the second half of this file).

import json

import numpy as np
import pytest
import tiny_pipelines
import tolerances
import torch
from PIL import Image

import families
import hooks
import models
import sample
import sampler
import softtokens
import trained
from shapes import backbones

torch.set_num_threads(1)
TINY = ["tiny-sd3", "tiny-sd1.5"]


def run(tmp_path, name, tag, *extra, prompt="a red circle above a blue square"):
    out = tmp_path / tag
    argv = ["--model", name, "--random-init", "--steps", "2", "--size", "16", "--batch", "4", "--out", str(out)]
    if "--prompts" not in extra:
        argv += ["--prompt", prompt]
    sample.main(argv + list(extra))
    with open(out / "records.jsonl") as f:
        records = [json.loads(line) for line in f]
    images = [np.asarray(Image.open(out / r["image"])) for r in records]
    return records, images


# -----------------------------------------------------------------------------
# The sampler core against loops written out here

# -----------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_image(tmp_path, name):
    _, a = run(tmp_path, name, "a", "--seed", "0", "1")
    _, b = run(tmp_path, name, "b", "--seed", "0", "1")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # the seeds differ, so do the images


@pytest.mark.parametrize("name", TINY)
def test_tokens_change_image_and_no_tokens_reproduce_plain(tmp_path, name):
    bb = backbones.build_tiny(name)
    softtokens.save(str(tmp_path / "tokens.safetensors"), strong_tokens(bb), model=name)
    softtokens.save(str(tmp_path / "empty.safetensors"), strong_tokens(bb, n_tokens=0), model=name)
    _, plain = run(tmp_path, name, "plain")
    _, with_tokens = run(tmp_path, name, "tokens", "--tokens", str(tmp_path / "tokens.safetensors"))
    _, empty = run(tmp_path, name, "empty", "--tokens", str(tmp_path / "empty.safetensors"))
    _, ignored = run(tmp_path, name, "ignored", "--tokens", str(tmp_path / "tokens.safetensors"), "--no-tokens")
    records, both = run(tmp_path, name, "compare", "--tokens", str(tmp_path / "tokens.safetensors"), "--compare")
    assert not np.array_equal(with_tokens[0], plain[0])
    assert np.array_equal(empty[0], plain[0]) and np.array_equal(ignored[0], plain[0])
    assert [r["variant"] for r in records] == ["plain", "tokens"]
    assert np.array_equal(both[0], plain[0]) and np.array_equal(both[1], with_tokens[0])
    # bit for bit below the 8-bit PNG as well
    image = sampler.generate(bb, ["a red circle"], [0], steps=2, size=16)
    handle = trained.attach(bb, trained.of_tokens([strong_tokens(bb, n_tokens=0)]))
    assert torch.equal(sampler.generate(bb, ["a red circle"], [0], steps=2, size=16, handle=handle), image)
    handle.remove()


def test_pair_tokens_psi_minus_and_ema(tmp_path):
    name = "tiny-sd3"
    bb = backbones.build_tiny(name)
    pair = strong_tokens(bb, softtokens.PairTokens)  # psi+, psi-, EMA copies all different
    same = strong_tokens(bb, softtokens.PairTokens)
    same.neg.load_state_dict(same.pos.state_dict())
    same.ema_pos.load_state_dict(same.pos.state_dict())
    for tag, tokens in (("pair", pair), ("same", same)):
        softtokens.save(str(tmp_path / f"{tag}.safetensors"), tokens, model=name)
    images = {}
    for tag in ("pair", "same"):
        path = str(tmp_path / f"{tag}.safetensors")
        for flag in ("", "--neg-uncond", "--ema"):
            records, (image,) = run(tmp_path, name, f"{tag}{flag}", "--tokens", path, *([flag] if flag else []))
            images[tag, flag] = image
            assert records[0]["uncond"] == ("psi-" if flag == "--neg-uncond" else "psi+")
            assert records[0]["token_set"] == ("ema_pos" if flag == "--ema" else "pos")
    assert not np.array_equal(images["pair", ""], images["pair", "--neg-uncond"])
    assert not np.array_equal(images["pair", ""], images["pair", "--ema"])
    assert np.array_equal(images["same", ""], images["same", "--neg-uncond"])  # psi- = psi+: the default
    assert np.array_equal(images["same", ""], images["same", "--ema"])


def test_prompt_files_records_and_grid(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo blue squares\n")
    specs = [
        {"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]},
        {"category": "counting", "objects": [{"shape": "square", "color": "blue"}], "count": 2},
    ]
    (tmp_path / "p.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "spec": s, "other": 1}) + "\n"
            for p, s in zip(["a red circle", "two blue squares"], specs)
        )
    )
    seeds = ["--seed", "5", "6"]
    text_records, text_images = run(tmp_path, "tiny-sd3", "text", "--prompts", str(tmp_path / "p.txt"), *seeds)
    json_records, json_images = run(tmp_path, "tiny-sd3", "jsonl", "--prompts", str(tmp_path / "p.jsonl"), *seeds)
    assert [(r["prompt"], r["seed"]) for r in text_records] == [
        ("a red circle", 5),
        ("a red circle", 6),
        ("two blue squares", 5),
        ("two blue squares", 6),
    ]
    assert all("spec" not in r for r in text_records)
    assert [r["spec"] for r in json_records] == [specs[0], specs[0], specs[1], specs[1]]
    assert all(np.array_equal(a, b) for a, b in zip(text_images, json_images))
    r = json_records[0]
    settings = (r["model"], r["steps"], r["cfg"], r["size"], r["tokens"], r["variant"])
    assert settings == ("tiny-sd3", 2, 4.0, 16, None, "plain")
    assert text_images[0].shape == (16, 16, 3) and (tmp_path / "jsonl" / "grid.png").exists()


def test_bad_input_fails_in_one_line_before_loading(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", no_load)
    monkeypatch.setattr(backbones, "build_tiny", no_load)
    single = tmp_path / "single.safetensors"
    softtokens.save(str(single), softtokens.SoftTokens(2, 4, 128), model="tiny-sd3")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a token file")
    base = ["--model", "tiny-sd3", "--random-init"]
    cases = [
        (["--model", "sd4", "--prompt", "x"], "unknown model"),
        (base, "exactly one of --prompt"),
        (base + ["--prompt", "a", "--prompts", "p.txt"], "exactly one of --prompt"),
        (
            base + ["--prompts", str(tmp_path / "missing.txt")],
            "missing.txt: no such file or folder; expected a text file",
        ),
        (base + ["--prompt", "a purple dog"], "unknown words dog, purple"),
        (base + ["--prompt", "a red circle", "--size", "48"], "multiples of 4 up to 32"),
        (base + ["--prompt", "a red circle", "--size", "30"], "multiples of 4 up to 32"),
        (base + ["--prompt", "a red circle", "--tokens", str(tmp_path / "nope.safetensors")], "no token file"),
        (base + ["--prompt", "a red circle", "--compare"], "pass --tokens"),
        (base + ["--prompt", "a red circle", "--tokens", str(single), "--neg-uncond"], "pair-token file"),
        (base + ["--prompt", "a red circle", "--tokens", str(tmp_path)], "is a folder of weights"),
        (
            base + ["--prompt", "a red circle", "--tokens", str(garbage)],
            "is a text file; expected a token, LoRA, prompt or whole-denoiser",
        ),
        (["--model", "sd3", "--random-init", "--prompt", "a cat"], "--random-init builds"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(argv + ["--out", str(tmp_path / "o")])
        assert message in str(e.value) and "\n" not in str(e.value), (argv, e.value)
    wrong = tmp_path / "wrong.safetensors"
    softtokens.save(str(wrong), softtokens.SoftTokens(1, 4, 128), model="tiny-sd1.5")
    with pytest.raises(SystemExit, match="not tiny-sd3"):
        sample.main(base + ["--prompt", "a red circle", "--tokens", str(wrong)])


# -----------------------------------------------------------------------------
# The README's example: tokens in the stock StableDiffusion3Pipeline, on random tiny components


def test_stock_sd3_pipeline_with_tokens(tmp_path):
    pipe = tiny_pipelines.sd3_pipeline(tmp_path)

    def draw():
        return pipe(
            "a red cube",
            num_inference_steps=2,
            guidance_scale=4.0,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    before = draw()
    pair = softtokens.PairTokens(2, 4, hooks.token_width(pipe.transformer))
    with torch.no_grad():
        pair.pos.tokens.normal_()
    softtokens.save(str(tmp_path / "tokens.safetensors"), pair, model="sd3")
    # the README's lines
    tokens, meta = softtokens.load(str(tmp_path / "tokens.safetensors"), which="pos")
    handle = hooks.attach(pipe.transformer, tokens.to("cpu"))
    with_tokens = draw()
    handle.remove()
    after = draw()
    assert (with_tokens - before).abs().max() > 1e-5
    assert torch.equal(after, before)


# -----------------------------------------------------------------------------
# The sampler core


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
        for i in range(steps):  # x <- x + (s_{i+1} - s_i) v: c_x = 1
            bound += float((s[i + 1] - s[i]).abs()) * per_forward
        return bound
    abar = models.ddpm_alphas_cumprod().double()
    ts = list(range(1 + (steps - 1) * (1000 // steps), 0, -(1000 // steps)))
    for i, t in enumerate(ts):  # DDIM: c_x = sqrt(a'/a), c_eps = sqrt(1-a') - sqrt(a'(1-a)/a)
        a, a_next = abar[t], (abar[ts[i + 1]] if i + 1 < steps else abar[0])
        c_x, c_eps = (a_next / a).sqrt(), ((1 - a_next).sqrt() - (a_next * (1 - a) / a).sqrt()).abs()
        bound = float(c_x) * bound + float(c_eps) * per_forward
    return bound


@pytest.mark.parametrize("name", TINY)
def test_generate_matches_written_out_sampler(name):
    bb = backbones.build_tiny(name)
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    got = sampler.generate(bb, prompts, seeds, steps=3, cfg=4.0, size=16)
    want = reference_sample(bb, prompts, seeds, 3, 4.0, 16)
    # The two loops do the same arithmetic, but not in the same batch layout (the sampler runs the
    # unconditional and conditional branches in one batch), so BLAS may sum in another order: the
    # results agree to fp32 rounding, amplified by the sample, not bit for bit.
    tolerance = fp32_sampler_tolerance(bb, 3, 4.0)
    assert (got - want).abs().max() <= tolerance, ((got - want).abs().max(), tolerance)
    assert sampler.ddim_timesteps(50)[0] == 981 and sampler.ddim_timesteps(50)[-1] == 1


def test_predict_token_rows_are_per_row():
    # cond_set / uncond_set per row: a row with -1 computes the plain model, a row with 0 uses the tokens
    bb = backbones.build_tiny("tiny-sd3")
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
    """families.FAMILIES' size facts follow from the architectures (hub configs: SD3-medium patch 2 with a
    192-position table, SD1.5 4 levels, SDXL 3; the tiny configs in models.py)."""
    f = families.FAMILIES
    assert (f["sd3"]["size_multiple"], f["sd3"]["max_size"]) == (8 * 2, 8 * 2 * 192)
    assert (f["sd1.5"]["size_multiple"], f["sdxl"]["size_multiple"]) == (8 * 2**3, 8 * 2**2)
    tiny = {name: f[name]["denoiser"] for name in ("tiny-sd3", "tiny-sd1.5")}
    assert f["tiny-sd3"]["size_multiple"] == f["tiny-sd3"]["vae_factor"] * tiny["tiny-sd3"]["patch_size"]
    assert (
        f["tiny-sd3"]["max_size"]
        == f["tiny-sd3"]["vae_factor"] * tiny["tiny-sd3"]["patch_size"] * tiny["tiny-sd3"]["pos_embed_max_size"]
    )
    assert f["tiny-sd1.5"]["size_multiple"] == f["tiny-sd1.5"]["vae_factor"] * 2 ** (
        len(tiny["tiny-sd1.5"]["block_out_channels"]) - 1
    )
    bb = backbones.build_tiny("tiny-sd3")
    cond = models.encode_prompts(bb, ["a red circle"])
    models.denoise(bb, torch.randn(1, *models.latent_shape(bb, 32)), 500.0, cond)  # the largest size runs
    with pytest.raises(ValueError):  # one patch row more does not
        models.denoise(bb, torch.randn(1, *models.latent_shape(bb, 36)), 500.0, cond)
