"""pretrain.py and the shipped tiny weights: a training step of each stage lowers its loss on a fixed
batch, the shipped autoencoder reconstructs renders the checker still accepts, and the weights in
weights/ load and reproduce a stored reference output (a broken checkpoint fails CI)."""

import os

import numpy as np
import pytest
import torch

import models
import shapes
from shapes import backbones, pretrain

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "tiny_reference.safetensors")


def fixed_step_lowers(loss_fn, params):
    """loss before and after one AdamW step, on the same batch and the same noise (a cloned generator)."""
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    opt = torch.optim.AdamW(params, lr=1e-4)  # AdamW's first step moves every weight by ~lr: keep it small
    torch.manual_seed(1)  # the VAE's posterior sample draws from the global generator: the same draw
    before = loss_fn(g)
    opt.zero_grad()
    before.backward()
    opt.step()
    g.set_state(state)
    torch.manual_seed(1)
    with torch.no_grad():
        after = loss_fn(g)
    return before.item(), after.item()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_one_denoiser_step_lowers_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    bb = backbones.build_tiny(name)
    bb.denoiser.train()
    bb.text_encoder.train()
    images, captions, _ = next(shapes.stream(0, 8))
    params = list(bb.denoiser.parameters()) + list(bb.text_encoder.parameters())
    before, after = fixed_step_lowers(lambda g: pretrain.denoiser_loss(bb, images, captions, g), params)
    assert after < before
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.text_encoder.parameters())
    assert all(p.grad is None for p in bb.vae.parameters())  # the autoencoder stays frozen


def test_one_autoencoder_step_lowers_the_loss_on_a_fixed_batch():
    vae = backbones.tiny_vae(0).train()
    images, _, _ = next(shapes.stream(0, 8))
    before, after = fixed_step_lowers(lambda g: pretrain.vae_loss(vae, images, g), list(vae.parameters()))
    assert after < before


def test_shipped_autoencoder_reconstructs_what_the_checker_accepts():
    vae = backbones.load_tiny_vae()
    report = pretrain.vae_report(vae, n=60)
    assert report["psnr"] > 25 and report["checker_accepts"] >= 0.95, report
    # the stored normalisation gives the denoisers latents of about unit variance
    images, _, _ = next(shapes.stream(5, 64))
    bb = backbones.build_tiny("tiny-sd3", vae=vae)
    x0 = models.encode_images(bb, images)
    assert abs(x0.std().item() - 1) < 0.15 and abs(x0.mean().item()) < 0.15


def test_wall_clock_budget_stops_cleanly_and_resumes(tmp_path):
    argv = [
        "--model",
        "tiny-vae",
        "--batch",
        "2",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "w"),
        "--work",
        str(tmp_path / "run"),
        "--ckpt-every",
        "1",
    ]
    pretrain.main(argv + ["--steps", "2"])
    assert os.path.exists(tmp_path / "w" / "vae.safetensors")
    pretrain.main(argv + ["--steps", "3", "--resume"])
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3"]  # appended, not rewritten
    pretrain.main(argv + ["--steps", "100", "--resume", "--minutes", "1e-9"])  # budget spent at once
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


def reference_inputs(bb):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, *models.latent_shape(bb), generator=g)
    return x, torch.tensor([250.0, 750.0]), ["two red circles", "a blue square to the left of a green circle"]


def reference_outputs(name):
    bb = backbones.load(name)
    x, t, prompts = reference_inputs(bb)
    with torch.no_grad():
        return models.denoise(bb, x, t, models.encode_prompts(bb, prompts))


def reference_reconstruction():
    vae = backbones.load_tiny_vae()
    images = shapes.to_tensor(np.stack([shapes.render(shapes.random_spec(i), rng=i) for i in range(2)]))
    with torch.no_grad():
        return vae.decode(vae.encode(images).latent_dist.mode()).sample


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5", "tiny-vae"])
def test_shipped_weights_reproduce_the_stored_output(name):
    from safetensors.torch import load_file

    stored = load_file(REFERENCE)[name]
    got = reference_reconstruction() if name == "tiny-vae" else reference_outputs(name)
    # fp32 forwards of a few layers: agreement to ~1e-5 relative on any BLAS; a changed weight moves it by far more
    torch.testing.assert_close(got, stored, rtol=1e-4, atol=1e-4)


if (
    __name__ == "__main__"
):  # rewrite the reference after re-running pretrain.py: PYTHONPATH=. python tests/lab/test_pretrain.py
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    outputs = {name: reference_outputs(name).contiguous() for name in ("tiny-sd3", "tiny-sd1.5")}
    outputs["tiny-vae"] = reference_reconstruction().contiguous()
    save_file(outputs, REFERENCE)
    print("wrote", REFERENCE)


def test_init_continues_from_a_weights_folder_with_its_step_and_log(tmp_path):
    """--init: the shipped weights (EMA only, no optimizer state) continue training with a fresh optimizer;
    the step count and the log go on from the folder's pretrain_log.csv, and --cooldown ends at lr 0."""
    import shutil

    folder = tmp_path / "shipped"
    folder.mkdir()
    for part in ("denoiser", "text_encoder"):
        shutil.copy(os.path.join(backbones.WEIGHTS_DIR, "tiny-sd3", f"{part}.safetensors"), folder)
    (folder / "pretrain_log.csv").write_text("step,loss,lr,seconds\n1,0.5,1e-4,1.0\n2,0.4,1e-4,2.0\n")
    argv = [
        "--model",
        "tiny-sd3",
        "--batch",
        "2",
        "--threads",
        "1",
        "--init",
        str(folder),
        "--out",
        str(tmp_path / "w"),
        "--work",
        str(tmp_path / "run"),
        "--steps",
        "4",
        "--cooldown",
        "2",
        "--ckpt-every",
        "1",
    ]
    pretrain.main(argv)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4"]
    assert float(rows[-1].split(",")[2]) == 0.0  # cooled down to lr 0 at --steps
    assert (tmp_path / "w" / "pretrain_log.csv").read_text().splitlines() == rows  # a later --init continues at 4
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and state["first_step"] == 2
    shipped = backbones.load_tiny("tiny-sd3", str(folder)).denoiser.state_dict()
    assert any(not torch.equal(v, shipped[k]) for k, v in state["ema_denoiser"].items())  # it trained
    with pytest.raises(SystemExit):
        pretrain.main(["--model", "tiny-sd3", "--init", str(tmp_path / "nowhere")])
