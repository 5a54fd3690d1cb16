"""bench.py: the training benchmark times step.train_step itself for every loss (AGSM one no-grad forward
more than SoftREPA), and the sampling benchmark measures both variants and their memory."""

import pytest
import torch

import families
import hooks
import models
import softtokens
import trained
from shapes import backbones, bench


def test_training_bench_times_the_train_step_of_every_loss():
    result = bench.main(["--model", "tiny-sd3", "--batch", "2", "--steps", "1", "--threads", "1"])
    assert set(result["median"]) == {"forward, no tokens", "forward, tokens", "softrepa", "agsm", "dsm"}
    assert all(t > 0 for t in result["median"].values())
    flops = result["flops"]
    # counted FLOPs: AGSM = SoftREPA + one no-grad forward of the same pairs (about 3F against 2F);
    # dsm runs the B matched pairs of the B x B
    assert flops["agsm"] == pytest.approx(flops["softrepa"] + flops["forward, tokens"], rel=0.05)
    assert flops["dsm"] < flops["softrepa"] / 1.5


def test_training_bench_batch_has_the_family_feature_shapes():
    bb = models.random_backbone("sd3", "test")
    batch = bench.random_batch(bb, 3, 32)
    width, pooled = models.text_widths(bb.denoiser.config)
    assert batch["latents"].shape == (3,) + models.latent_shape(bb, 32)
    assert batch["hidden"].shape == (3, families.FAMILIES["sd3"]["text_tokens"], width)
    assert batch["pooled"].shape == (3, pooled) and len(set(batch["captions"])) == 3


def strong_tokens(bb):
    torch.manual_seed(0)
    f = bb.facts
    t = softtokens.SoftTokens(f["token_layers"], f["n_tokens"], hooks.token_width(bb.denoiser))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    return t


def test_sampling_bench_measures_both_variants():
    bb = backbones.build_tiny("tiny-sd3")
    result = bench.bench_sampling(
        bb,
        trained.Trained("test", "tokens", [strong_tokens(bb)], None, "tokens"),
        steps=1,
        cfg=4.0,
        size=16,
        batch=1,
        repeats=1,
        progress=False,
    )
    assert result["latency_plain_s"] > 0 and result["latency_tokens_s"] > 0
    # activations of a whole sampler step are counted: at least the 2 x 3 x 16 x 16 CFG batch
    assert result["activations_plain_mb"] * 2**20 >= 2 * 3 * 16 * 16 * 4
    assert result["activations_tokens_mb"] >= result["activations_plain_mb"] * 0.5
    weights = sum(p.numel() for p in bb.denoiser.parameters()) * 4 / 2**20
    assert result["weights_mb"] == pytest.approx(weights)
    assert result["peak_memory_plain_mb"] == pytest.approx(weights + result["activations_plain_mb"])
    cli = bench.main(
        ["--sampling", "--model", "tiny-sd1.5", "--steps", "1", "--size", "16", "--batch", "1", "--repeats", "1"]
    )
    assert cli["model"] == "tiny-sd1.5" and cli["token_shape"] == [1, 4, 128]


def test_peak_flops_read_from_the_device_name():
    # the most specific entry whose words are all in the name; an unknown card has no peak (MFU needs the flag)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("NVIDIA H100 NVL") == 835e12
    assert bench.peak_flops("NVIDIA H200") == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_flops("NVIDIA A10G") is None and bench.peak_flops("NVIDIA GeForce RTX 4090") is None
    assert bench.device_peak(torch.device("cpu")) is None and bench.device_peak(torch.device("cpu"), 2.5) == 2.5e12


def test_training_bench_with_rows_per_forward_and_chosen_losses():
    bb = backbones.build_tiny("tiny-sd3")
    args = type("Args", (), dict(model="tiny-sd3", batch=2, steps=1, peak_tflops=1.0))()
    result = bench.bench_training(bb, args, 32, "fp32", rows_per_forward=1, names=("softrepa", "agsm"))
    assert set(result["median"]) == {"softrepa", "agsm"} and result["pairs"] == {"softrepa": 4, "agsm": 4}
    assert result["mfu"]["agsm"] == pytest.approx(result["flops"]["agsm"] / result["median"]["agsm"] / 1e12)
