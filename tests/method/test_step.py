"""step.train_step: --rows-per-forward (the authors' --nrows) takes the same step as the whole pair
matrix at once -- tokens after the update and every logged number, within the fp32 tolerance -- for
each loss, both architectures, with and without gradient checkpointing; and a duplicate caption in a
chunk is still no negative. (The run between steps, run.py: tests/method/test_run.py.)"""

from types import SimpleNamespace

import pytest
import tolerances
import torch

import recipe
import softtokens
import step as training
import trained
from shapes import backbones

torch.set_num_threads(1)


def one_step(name, loss, rows_per_forward, checkpointing, captions):
    bb = backbones.build_tiny(name, seed=0)
    bb.denoiser.requires_grad_(False)
    if checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
        bb.denoiser.train()  # diffusers checkpoints in training mode only
    settings = SimpleNamespace(**recipe.defaults(name, loss, steps=100))
    settings.rows_per_forward = rows_per_forward
    tokens = softtokens.make_tokens(bb, loss, seed=0)
    with torch.no_grad():  # tokens that matter, so that the step moves them visibly
        for p in tokens.parameters():
            p.normal_(0, 0.5)
    tokens.update_ema(0.0) if loss == "agsm" else None
    opt = torch.optim.AdamW(tokens.trainable(), lr=settings.lr, weight_decay=settings.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    batch = dict(images=torch.rand((len(captions), 3, 32, 32), generator=g) * 2 - 1, captions=captions, new_bad=0)
    handle = trained.attach(bb, trained.of_tokens(tokens.sets))
    stats = training.train_step(bb, tokens, handle, opt, sched, scaler, settings, batch, step=3)
    handle.remove()
    grads = {k: p.grad.clone() for k, p in zip(range(99), tokens.trainable())}
    return {k: v.detach().clone() for k, v in tokens.state_dict().items()}, stats, grads


CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a red square", "a white circle"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
@pytest.mark.parametrize("loss", ["softrepa", "agsm", "dsm"])
def test_rows_per_forward_takes_the_unchunked_step(name, loss, checkpointing):
    whole, whole_stats, whole_grads = one_step(name, loss, 0, checkpointing, CAPTIONS)
    for rows in (1, 3):  # one row at a time, and an uneven split (3 + 1)
        chunked, stats, grads = one_step(name, loss, rows, checkpointing, CAPTIONS)
        # the same arithmetic in another batch layout (tolerances.py): ~1e-4 of unit-size numbers
        for k in whole_grads:
            torch.testing.assert_close(grads[k], whole_grads[k], **tolerances.REORDERED_FP32)
        for k in whole:
            torch.testing.assert_close(chunked[k], whole[k], **tolerances.REORDERED_FP32)
        for k in training.STATS:
            assert stats[k] == pytest.approx(whole_stats[k], rel=1e-4, abs=1e-5), k
    moved = one_step(name, loss, 0, checkpointing, CAPTIONS)[0]
    assert all(torch.equal(moved[k], whole[k]) for k in whole)  # deterministic: the comparison means something


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
def test_a_duplicate_caption_is_no_negative_in_any_chunk(loss):
    captions = ["a red circle", "a red circle", "a green triangle above a red square", "a white circle"]
    whole, whole_stats, _ = one_step("tiny-sd3", loss, 0, False, captions)
    chunked, stats, _ = one_step("tiny-sd3", loss, 1, False, captions)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], **tolerances.REORDERED_FP32)
    assert stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-4)


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("params", ["tokens", "prompt"])
def test_distill_target_is_the_frozen_models_prediction_for_the_prefixed_caption(params):
    import hooks
    import models
    import whole

    bb = backbones.load("tiny-sd3", random_init=True)
    captions = ["a red square", "two blue circles"]
    x_t, timesteps = torch.randn(2, *models.latent_shape(bb)), torch.tensor([300.0, 700.0])
    plain = models.denoise(bb, x_t, timesteps, models.encode_prompts(bb, [f"some {c}" for c in captions]))
    if params == "tokens":
        tokens = softtokens.make_tokens(bb, "dsm", seed=0, n_tokens=4, layers=2, time_table="off", init="normal")
        with torch.no_grad():
            for p in tokens.parameters():
                p.add_(1.0)  # tokens that change the prediction
        handle = hooks.attach(bb.denoiser, tokens.sets)
    else:  # training a prompt (train.make_trainable): the denoiser as it is; the prompt acts in encode_batch
        handle = whole.WholeHandle(bb.denoiser)
    args = SimpleNamespace(distill_prefix="some", params=params)
    teacher = training.distill_target(bb, handle, args, captions, x_t, timesteps)
    torch.testing.assert_close(teacher, plain, rtol=0, atol=1e-6)
    if params == "tokens":
        with handle.rows(None):  # the attached tokens do change it
            moved = models.denoise(bb, x_t, timesteps, models.encode_prompts(bb, [f"some {c}" for c in captions]))
        assert not torch.allclose(moved, plain)
    assert (
        training.distill_target(
            bb, handle, SimpleNamespace(distill_prefix=None, params=params), captions, x_t, timesteps
        )
        is None
    )
