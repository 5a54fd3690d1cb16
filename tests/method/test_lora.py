"""lora.py: LoRA as the second parameterisation of the same step (SoftREPA Table 3, app. H). The adapters
sit where the paper's parameter counts say; a run's file is diffusers' LoRA format (the stock pipeline's
load_lora_weights reads it and computes what our backbone computes); per-row adapter choice equals
separate forwards; train.py trains softrepa and dsm on them and resumes exactly; sample.py takes the
file like a token file; the one-line errors."""

import os

import pytest
import torch

import families
import lora
import models
import sample
import softtokens
import train
import trained
from shapes import backbones

FAST = ["--threads", "1", "--batch", "4", "--workers", "1", "--log-every", "100"]


def perturbed(bb, rank=4, blocks=2, seed=1):
    """Adapters with random B (a fresh adapter is the stock model: B starts at 0)."""
    params = lora.add(bb, rank, blocks)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return params


def inputs(bb, n=2, size=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n,) + models.latent_shape(bb, size), generator=g)
    return x, torch.full((n,), 500.0), models.encode_prompts(bb, ["two red circles", "a blue square"][:n])


def test_the_paper_layout_has_table_11s_parameter_counts():
    """SD3 at real size (on the meta device): rank 4 on blocks 1-5 0.49M ("0.4M"), rank 8 on 1-5 and rank
    4 on 1-10 0.98M ("0.9M"), all 24 blocks 2.35M ("2.3M"); the soft tokens 0.80M ("0.9M")."""
    counts = {}
    for rank, blocks in ((4, 5), (8, 5), (4, 10), (4, "all")):
        bb = models.Backbone("sd3", families.FAMILIES["sd3"], models.random_denoiser_on_meta("sd3"))
        counts[(rank, blocks)] = lora.add(bb, rank, blocks).numel()
    assert counts[(4, 5)] == 5 * 8 * 2 * 1536 * 4 == 491_520
    assert counts[(8, 5)] == counts[(4, 10)] == 983_040
    assert counts[(4, "all")] == 24 * 8 * 2 * 1536 * 4 - 2 * 1536 * 4  # the last block has no to_add_out
    tokens = softtokens.SoftTokens(5, 4, 1536, time_table=True)
    assert sum(p.numel() for p in tokens.parameters()) == 798_720


def test_a_fresh_adapter_is_the_stock_model_and_remove_gives_it_back(tiny_sd3):
    x, t, cond = inputs(tiny_sd3)
    plain = models.denoise(tiny_sd3, x, t, cond)
    lora.add(tiny_sd3, 4, 2)
    assert torch.equal(models.denoise(tiny_sd3, x, t, cond), plain)
    lora.LoraHandle(tiny_sd3.denoiser).remove()
    assert not any(".lora_" in n for n, _ in tiny_sd3.denoiser.named_parameters())


def test_per_row_choice_equals_separate_forwards(tiny_sd3):
    x, t, cond = inputs(tiny_sd3)
    plain = models.denoise(tiny_sd3, x, t, cond)
    perturbed(tiny_sd3)
    handle = lora.LoraHandle(tiny_sd3.denoiser)
    adapted = models.denoise(tiny_sd3, x, t, cond)
    with handle.rows(torch.tensor([-1, 0])):
        mixed = models.denoise(tiny_sd3, x, t, cond)
    handle.remove()
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family,pipeline",
    [("sd3", "StableDiffusion3Pipeline"), ("sd1.5", "StableDiffusionPipeline"), ("flux-dev", "FluxPipeline")],
)
def test_the_file_loads_with_the_stock_pipelines_load_lora_weights(tmp_path, stock_folder, family, pipeline):
    import diffusers

    folder = stock_folder(family)
    bb = models.load(family, pretrained=folder)
    params = perturbed(bb, 4, lora.parse_blocks(None, bb.facts))
    path = str(tmp_path / "lora.safetensors")
    lora.save(path, params, bb.facts, model=family, loss="softrepa")
    x, t, cond = inputs(bb, size=64)
    ours = models.denoise(bb, x, t, cond)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.load_lora_weights(path)
    stock_denoiser = pipe.unet if family == "sd1.5" else pipe.transformer
    stock = models.denoise(models.Backbone(family, bb.facts, stock_denoiser), x, t, cond)
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
    # and our reader gives the same adapters to a fresh backbone
    fresh = models.load(family, pretrained=folder)
    loaded = trained.read(path, family)
    with trained.attached(fresh, loaded) as handle:
        torch.testing.assert_close(models.denoise(fresh, x, t, cond), ours, rtol=0, atol=1e-6)
        with handle.rows(torch.full((2,), -1)):
            plain = models.denoise(fresh, x, t, cond)
    assert loaded.token_set == "lora" and not torch.allclose(plain, ours)
    torch.testing.assert_close(models.denoise(fresh, x, t, cond), plain, rtol=0, atol=0)  # off again


@pytest.mark.parametrize("loss", ["softrepa", "dsm"])
def test_train_lora_then_sample_with_its_file(tmp_path, loss):
    out = str(tmp_path / "run")
    result = train.main(
        FAST + ["--model", "tiny-sd3", "--loss", loss, "--params", "lora", "--steps", "2", "--out", out]
    )
    assert result["tokens_path"].endswith("lora.safetensors") and lora.is_lora_file(result["tokens_path"])
    assert all(p.abs().sum() > 0 for n, p in result["tokens"].named.items() if "lora_B" in n)  # B moved off 0
    sample.main(
        [
            "--model",
            "tiny-sd3",
            "--prompt",
            "two red circles",
            "--tokens",
            result["tokens_path"],
            "--compare",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "samples"),
            "--threads",
            "1",
        ]
    )
    import numpy as np
    from PIL import Image

    plain, tuned = (
        np.asarray(Image.open(tmp_path / "samples" / "images" / f"00000-{v}.png").convert("RGB"), dtype=float)
        for v in ("plain", "tokens")
    )
    assert np.abs(plain - tuned).max() > 0


def test_lora_run_resumes_exactly(tmp_path):
    straight = train.main(
        FAST
        + [
            "--model",
            "tiny-sd3",
            "--loss",
            "softrepa",
            "--params",
            "lora",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    first = FAST + ["--model", "tiny-sd3", "--loss", "softrepa", "--params", "lora", "--out", str(tmp_path / "b")]
    train.main(first + ["--steps", "2"])
    resumed = train.main(first + ["--steps", "4", "--resume", "latest"])
    for name, p in straight["tokens"].named.items():
        torch.testing.assert_close(resumed["tokens"].named[name], p, rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--loss", "agsm", "--params", "lora"], "trains two token sets (psi+ and psi-)"),
        (["--loss", "softrepa", "--params", "lora", "--layers", "3"], "--layers does nothing in this run"),
        (["--loss", "softrepa", "--params", "lora", "--lora-blocks", "first"], "--lora-blocks first"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--model", "tiny-sd3", "--steps", "1", "--out", str(tmp_path / "r")] + argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_lora_file_refuses_the_agsm_options_and_another_family(tmp_path, tiny_sd3):
    params = perturbed(tiny_sd3)
    path = str(tmp_path / "lora.safetensors")
    lora.save(path, params, tiny_sd3.facts, model="tiny-sd3", loss="softrepa")
    lora.LoraHandle(tiny_sd3.denoiser).remove()
    with pytest.raises(SystemExit, match="need an AGSM pair-token file"):
        trained.read(path, "tiny-sd3", neg_uncond=True)
    with pytest.raises(SystemExit, match="not tiny-sd1.5: pass --model tiny-sd3"):
        trained.read(path, "tiny-sd1.5")
    assert os.path.getsize(path) < 200_000


def test_a_lora_file_edits_like_a_token_file_with_per_row_branches(tmp_path):
    """edit.py's UNet editors run the source and target branches in one batch with a per-row choice
    (source: plain, target: adapted): the LoRA handle gives each row its own weights."""
    from PIL import Image

    import edit
    import shapes

    bb = backbones.load("tiny-sd1.5")
    params = perturbed(bb, 4, ("down",))
    path = str(tmp_path / "lora.safetensors")
    lora.save(path, params, bb.facts, model="tiny-sd1.5", loss="softrepa")
    Image.fromarray(
        shapes.render({"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]}, 32, 0)
    ).save(tmp_path / "in.png")
    record = edit.main(
        [
            "--model",
            "tiny-sd1.5",
            "--image",
            str(tmp_path / "in.png"),
            "--src",
            "a red circle",
            "--tgt",
            "a blue circle",
            "--method",
            "direct+pnp",
            "--steps",
            "4",
            "--tokens",
            path,
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
        ]
    )
    assert record["token_set"] == "lora"
    import numpy as np

    plain, tuned = (
        np.asarray(Image.open(tmp_path / "out" / n), dtype=float) for n in ("edited.png", "edited-tokens.png")
    )
    assert np.abs(plain - tuned).max() > 0


def test_two_rank_lora_run_keeps_the_adapters_identical(tmp_path):
    """DDP with adapters instead of tokens: the same all-reduce, the same AdamW step on every rank."""
    import torch.multiprocessing as mp
    from test_train import free_port, run_rank

    argv = FAST + [
        "--model",
        "tiny-sd3",
        "--loss",
        "softrepa",
        "--params",
        "lora",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
    ]
    single = train.main(
        FAST
        + [
            "--model",
            "tiny-sd3",
            "--loss",
            "softrepa",
            "--params",
            "lora",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "one"),
        ]
    )
    mp.start_processes(run_rank, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
    assert any(not torch.equal(single["tokens"].named[n], ranks[0][n]) for n in ranks[0])  # both ranks' data
