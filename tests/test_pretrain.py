"""pretrain.py and the shipped tiny weights: a training step lowers the loss on a fixed batch, and the
weights in weights/ load and reproduce a stored reference output (a broken checkpoint fails CI)."""
import os

import pytest
import torch

import models
import pretrain
import shapes

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "tiny_reference.safetensors")


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    bb = models.build_tiny(name)
    bb.denoiser.train()
    bb.text_encoder.train()
    images, captions, _ = next(shapes.stream(0, 8))
    g = torch.Generator().manual_seed(0)
    noise, u = torch.randn(images.shape, generator=g), torch.rand(8, generator=g)
    params = list(bb.denoiser.parameters()) + list(bb.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = pretrain.batch_loss(bb, images, captions, noise, u)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = pretrain.batch_loss(bb, images, captions, noise, u)
    assert after.item() < before.item()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.text_encoder.parameters())


def reference_inputs(bb):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, *models.latent_shape(bb), generator=g)
    return x, torch.tensor([250.0, 750.0]), ["two red circles", "a blue square to the left of a green circle"]


def reference_outputs(name):
    bb = models.load(name)
    x, t, prompts = reference_inputs(bb)
    with torch.no_grad():
        return models.denoise(bb, x, t, models.encode_prompts(bb, prompts))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_shipped_weights_reproduce_the_stored_output(name):
    from safetensors.torch import load_file
    stored = load_file(REFERENCE)[name]
    torch.testing.assert_close(reference_outputs(name), stored, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":   # rewrite the reference after re-running pretrain.py: python tests/test_pretrain.py
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    save_file({name: reference_outputs(name).contiguous() for name in ("tiny-sd3", "tiny-sd1.5")}, REFERENCE)
    print("wrote", REFERENCE)
