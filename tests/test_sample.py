# Tests for sample.py: the command line in-process on random tiny backbones (same seed -> same image;
# tokens change the image; no tokens, an empty token file and --no-tokens give the plain model bit for
# bit; psi- / EMA selection), the records eval.py reads, the one-line input errors, and the stock
# diffusers pipeline with hooks (README example). The sampler itself: tests/test_sampler.py.

import json

import numpy as np
import pytest
import torch

from PIL import Image

import hooks
import models
import sample
import softtokens
import tiny_pipelines
import sampler
from test_sampler import strong_tokens

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
    bb = models.build_tiny(name)
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
    handle = softtokens.attach_tokens(bb, [strong_tokens(bb, n_tokens=0)])
    assert torch.equal(sampler.generate(bb, ["a red circle"], [0], steps=2, size=16, handle=handle), image)
    handle.remove()


def test_pair_tokens_psi_minus_and_ema(tmp_path):
    name = "tiny-sd3"
    bb = models.build_tiny(name)
    pair = strong_tokens(bb, softtokens.PairTokens)       # psi+, psi-, EMA copies all different
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
    specs = [{"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]},
             {"category": "counting", "objects": [{"shape": "square", "color": "blue"}], "count": 2}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "spec": s, "other": 1}) + "\n"
                                              for p, s in zip(["a red circle", "two blue squares"], specs)))
    seeds = ["--seed", "5", "6"]
    text_records, text_images = run(tmp_path, "tiny-sd3", "text", "--prompts", str(tmp_path / "p.txt"), *seeds)
    json_records, json_images = run(tmp_path, "tiny-sd3", "jsonl", "--prompts", str(tmp_path / "p.jsonl"), *seeds)
    assert [(r["prompt"], r["seed"]) for r in text_records] == [
        ("a red circle", 5), ("a red circle", 6), ("two blue squares", 5), ("two blue squares", 6)]
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
    monkeypatch.setattr(models, "build_tiny", no_load)
    single = tmp_path / "single.safetensors"
    softtokens.save(str(single), softtokens.SoftTokens(2, 4, 128), model="tiny-sd3")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a token file")
    base = ["--model", "tiny-sd3", "--random-init"]
    cases = [
        (["--model", "sd4", "--prompt", "x"], "unknown model"),
        (base, "exactly one of --prompt"),
        (base + ["--prompt", "a", "--prompts", "p.txt"], "exactly one of --prompt"),
        (base + ["--prompts", str(tmp_path / "missing.txt")], "no prompts file"),
        (base + ["--prompt", "a purple dog"], "unknown words dog, purple"),
        (base + ["--prompt", "a red circle", "--size", "48"], "multiples of 4 up to 32"),
        (base + ["--prompt", "a red circle", "--size", "30"], "multiples of 4 up to 32"),
        (base + ["--prompt", "a red circle", "--tokens", str(tmp_path / "nope.safetensors")], "no token file"),
        (base + ["--prompt", "a red circle", "--compare"], "pass --tokens"),
        (base + ["--prompt", "a red circle", "--tokens", str(single), "--neg-uncond"], "pair-token file"),
        (base + ["--prompt", "a red circle", "--tokens", str(tmp_path)], "without dc_tokens.pth"),
        (base + ["--prompt", "a red circle", "--tokens", str(garbage)], "cannot read"),
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
        return pipe("a red cube", num_inference_steps=2, guidance_scale=4.0, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

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
