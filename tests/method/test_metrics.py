"""metrics.py: the written-out metric maths against closed forms, and the metric models' loading and
scoring code on tiny random models saved to a temporary folder (the same from_pretrained path as the
hub). CPU, offline."""

import math

import numpy as np
import pytest
import torch
from tiny_metric_models import BLUE, RED

import benchmarks
import metrics

torch.set_num_threads(1)


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_is_the_shift():
    a = np.random.default_rng(0).normal(size=(400, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    assert abs(metrics.fid_from_features(a, a)) < 1e-8
    # Same covariance, means 1 apart in each of 8 dims: d^2 = |mu1 - mu2|^2 = 8
    assert metrics.fid_from_features(a, a + 1.0) == pytest.approx(8.0, abs=1e-6)
    assert metrics.fid_from_features(a, 2 * a) > 1.0


def test_frechet_distance_closed_forms():
    # Diagonal (commuting) covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 = 1 + 1 + 1
    assert metrics.frechet_distance([0, 1], np.diag([1.0, 4.0]), [1, 1], np.diag([4.0, 9.0])) == pytest.approx(3.0)
    # Non-commuting 2x2 covariances against the written-out 2x2 formula
    # tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for a 2x2 matrix A with non-negative eigenvalues
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])
    prod = s1 @ s2
    cross = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * cross
    assert metrics.frechet_distance([0.5, 0], s1, [0, 0], s2) == pytest.approx(expected, abs=1e-9)


def test_psnr_and_ssim_ideal_values_and_references():
    x = np.random.default_rng(0).uniform(size=(24, 24, 3))
    assert metrics.psnr(x, x) == math.inf
    assert metrics.psnr(x, x + 0.1) == pytest.approx(20.0)  # MSE 0.01 with range 1
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    # Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    const = lambda v: np.full((16, 16, 3), v)  # noqa: E731
    assert metrics.ssim(const(a), const(b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    noisy = np.clip(x + np.random.default_rng(1).normal(scale=0.2, size=x.shape), 0, 1)
    assert metrics.ssim(x, noisy) < 0.95
    # An 11 x 11 image has one window: SSIM from the Gaussian-weighted moments, written out
    p, q = x[:11, :11, :1], noisy[:11, :11, :1]
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g)[..., None] / np.outer(g, g).sum()
    mp, mq = (w * p).sum(), (w * q).sum()
    vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2))
    assert metrics.ssim(p, q) == pytest.approx(expected, rel=1e-9)


def test_pie_mask_rle_decodes_like_pie_bench():
    mask = benchmarks.mask_decode([7, 2, 14, 3, 100, 5], shape=(6, 6))  # pairs running off the end are cut
    expected = np.ones((6, 6), np.float32)  # the border is always "edited"
    expected[1:5, 1:5] = 0
    expected.flat[[7, 8, 14, 15, 16]] = 1
    assert np.array_equal(mask, expected)


def test_lpips_of_identical_images_is_zero():
    pytest.importorskip("lpips", reason="lpips is optional (requirements-eval.txt)")
    model = metrics.load_lpips("squeeze", random_backbone=True)  # no download: random backbone
    x = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert metrics.lpips_distance(model, x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips_distance(model, x, 255 - x) > 0


def test_metric_models_are_skipped_with_a_message_when_weights_are_missing(tmp_path, capsys):
    hub_dir = torch.hub.get_dir()
    try:
        assert metrics.load_clip("clip", metrics.HUB["clip"], weights=str(tmp_path)) is None
        assert (
            metrics.load_clip(
                "pickscore",
                metrics.HUB["pickscore"],
                weights=str(tmp_path),
                processor_id=metrics.HUB["pick_processor"],
            )
            is None
        )
        assert metrics.load_dino(weights=str(tmp_path)) is None
        assert metrics.load_hps(weights=str(tmp_path)) is None
        assert metrics.load_imagereward(weights=str(tmp_path)) is None
        assert metrics.load_inception(weights=str(tmp_path)) is None
        assert metrics.load_lpips("alex", weights=str(tmp_path)) is None
    finally:
        torch.hub.set_dir(hub_dir)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "clip",
        "pickscore",
        "structure_distance",
        "hps",
        "imagereward",
        "fid",
        "lpips",
    ]
    assert all("skipped" in line for line in lines)


def test_clip_and_pickscore_prefer_the_matching_caption(tiny_clip_dir):
    clip = metrics.load_clip("clip", "someone/tiny-clip", weights=str(tiny_clip_dir.parent))  # DIR/<last part>
    assert clip is not None
    images, prompts = [RED, RED, BLUE, BLUE], ["red", "blue", "blue", "red"]
    scores = metrics.clip_score(clip, images, prompts)
    assert scores == pytest.approx([100, 0, 100, 0], abs=1e-3)  # 100 * max(cos, 0)
    pick = metrics.pick_score(clip, images, prompts)  # logit_scale * cos
    scale = float(clip[0].logit_scale.detach().exp())
    assert pick == pytest.approx([scale, 0, scale, 0], abs=1e-3)


def test_structure_distance_through_the_dino_loader(tiny_dino_dir):
    dino = metrics.load_dino(weights=str(tiny_dino_dir.parent))
    assert dino is not None
    x = np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    sim = metrics.dino_key_self_similarity(dino, x)
    assert sim.shape == (17, 17)  # CLS + (32 / 8)^2 patches
    assert torch.allclose(sim.diagonal(), torch.ones(17), atol=1e-5)
    assert metrics.structure_distance(dino, x, x) == pytest.approx(0.0, abs=1e-10)
    assert metrics.structure_distance(dino, x, np.ascontiguousarray(x[::-1])) > 1e-6
