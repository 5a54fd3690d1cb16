"""losses.py against small hand-computed examples (SoftREPA eqs. 9-14, AGSM eqs. 7-17)."""

import math

import pytest
import torch

import losses
from shapes import backbones


def example(B=3, C=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, B, C, 2, 2, generator=g)
    target = torch.randn(B, C, 2, 2, generator=g)
    return pred, target


def test_pair_errors_by_hand():
    pred, target = example()
    errors = losses.pair_errors(pred, target)
    for i in range(3):
        for j in range(3):
            by_hand = sum((pred[i, j].flatten()[k] - target[i].flatten()[k]) ** 2 for k in range(8)) / 8
            assert math.isclose(errors[i, j].item(), by_hand.item(), rel_tol=1e-6)


def test_softrepa_equals_explicit_cross_entropy():
    errors = torch.tensor([[0.10, 0.30, 0.25], [0.40, 0.12, 0.20], [0.33, 0.31, 0.15]])
    tau, scale = 0.07, 4.0
    expected = 0.0
    for i in range(3):
        logits = [scale * math.exp(-errors[i, j].item() / tau) for j in range(3)]
        expected += -math.log(math.exp(logits[i]) / sum(math.exp(logit) for logit in logits))
    expected /= 3
    assert math.isclose(losses.softrepa_loss(errors=errors, tau=tau, scale=scale).item(), expected, rel_tol=1e-6)
    dsm = (0.10 + 0.12 + 0.15) / 3
    assert math.isclose(
        losses.softrepa_loss(errors=errors, tau=tau, scale=scale, dweight=10.0).item(),
        expected + 10 * dsm,
        rel_tol=1e-6,
    )


def test_softrepa_prefers_matched_pairs():
    good = torch.tensor([[0.1, 0.5], [0.5, 0.1]])
    bad = torch.tensor([[0.5, 0.1], [0.1, 0.5]])
    assert losses.softrepa_loss(errors=good) < losses.softrepa_loss(errors=bad)


def test_classifier_accuracy():
    errors = torch.tensor([[0.1, 0.5, 0.4], [0.2, 0.3, 0.1], [0.9, 0.8, 0.7]])
    assert losses.classifier_accuracy(errors).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_agsm_with_zero_gamma_is_plain_matching(prediction):
    pred, target = example(seed=1)
    pred_ema = pred + 0.1 * torch.randn_like(pred)
    loss, _, _ = losses.agsm_loss(pred=pred, pred_ema=pred_ema, target=target, gamma_pos=0.0, gamma_neg=0.0)
    errors = losses.pair_errors(pred, target)
    eye = torch.eye(3, dtype=torch.bool)
    assert loss.item() == pytest.approx(errors[eye].mean().item() + errors[~eye].mean().item(), rel=1e-6)


def test_agsm_delta_is_zero_when_all_texts_agree():
    _, target = example()
    same = torch.randn(3, 1, 2, 2, 2).expand(3, 3, 2, 2, 2)
    _, w, targets = losses.agsm_loss(pred=same, pred_ema=same, target=target, gamma_pos=1.0, gamma_neg=1.0)
    torch.testing.assert_close(targets, target.unsqueeze(1).expand_as(targets))
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_agsm_targets_term_by_term(prediction):
    """Eq. 15 (epsilon) / eq. 16 (flow) written out with loops, Alg. 1 lines 8-10."""
    pred_ema, target = example(seed=2)
    tau, gp, gn = 0.5, 1.0, 0.1
    _, w, targets = losses.agsm_loss(
        pred=pred_ema, pred_ema=pred_ema, target=target, gamma_pos=gp, gamma_neg=gn, tau=tau
    )
    for i in range(3):
        errs = [((pred_ema[i, k] - target[i]) ** 2).mean() for k in range(3)]
        weights = torch.softmax(-torch.stack(errs) / tau, dim=0)
        torch.testing.assert_close(w[i], weights)
        mean_pred = sum(weights[k] * pred_ema[i, k] for k in range(3))
        for j in range(3):
            gamma = gp if i == j else -gn
            expected = target[i] + gamma * 1.0 * (pred_ema[i, j] - mean_pred)  # A~(t) = B(t) = 1
            torch.testing.assert_close(targets[i, j], expected)


def test_agsm_loss_regresses_onto_detached_targets():
    pred, target = example(seed=3)
    pred = pred.clone().requires_grad_(True)
    pred_ema = pred.detach() + 0.05
    loss, _, _ = losses.agsm_loss(pred=pred, pred_ema=pred_ema, target=target, gamma_pos=1.0, gamma_neg=0.1, tau=0.5)
    loss.backward()
    _, _, targets = losses.agsm_loss(
        pred=pred_ema, pred_ema=pred_ema, target=target, gamma_pos=1.0, gamma_neg=0.1, tau=0.5
    )
    per_pair = (pred.detach() - targets).pow(2).flatten(2).mean(2)
    eye = torch.eye(3, dtype=torch.bool)
    assert loss.item() == pytest.approx(per_pair[eye].mean().item() + per_pair[~eye].mean().item(), rel=1e-6)
    # gradient of a mean squared error onto a constant: 2 (pred - target) / numel, per subset mean
    numel = 8
    expected = 2 * (pred.detach() - targets) / numel
    expected[eye] /= 3
    expected[~eye] /= 6
    torch.testing.assert_close(pred.grad, expected)


def test_bradley_terry_two_texts_equals_plackett_luce():
    """With B = 2 each image has one negative: the pairwise and the listwise models coincide."""
    pred_ema, target = example(B=2, seed=4)
    _, _, pl = losses.agsm_loss(pred=pred_ema, pred_ema=pred_ema, target=target, gamma_pos=1.0, gamma_neg=1.0, tau=0.3)
    _, _, bt = losses.agsm_loss(
        pred=pred_ema,
        pred_ema=pred_ema,
        target=target,
        gamma_pos=1.0,
        gamma_neg=1.0,
        tau=0.3,
        bradley_terry=True,
    )
    torch.testing.assert_close(pl, bt)


def test_bradley_terry_differs_from_plackett_luce_with_more_texts():
    pred_ema, target = example(B=3, seed=5)
    _, _, pl = losses.agsm_loss(pred=pred_ema, pred_ema=pred_ema, target=target, tau=0.3)
    _, _, bt = losses.agsm_loss(pred=pred_ema, pred_ema=pred_ema, target=target, tau=0.3, bradley_terry=True)
    assert not torch.allclose(pl, bt)


def test_dsm_loss_is_the_matched_mean():
    errors = torch.tensor([[1.0], [3.0]])  # (B, 1): the matched pairs alone, as the step runs them
    assert losses.dsm_loss(errors=errors).item() == 2.0
    # a chunk of rows contributes its share of the mean over the step's B rows
    assert losses.dsm_loss(errors=errors[:1], batch_rows=2).item() + losses.dsm_loss(
        errors=errors[1:], batch_rows=2
    ).item() == pytest.approx(2.0)


def test_agsm_accepts_extra_gathered_negatives():
    """train.py --gather-text: B images x K captions, K > B, matched pairs on the first B columns' diagonal.
    Extra captions that predict exactly like an existing one only re-weight; the per-pair formula holds."""
    g = torch.Generator().manual_seed(6)
    pred_ema, target = torch.randn(2, 5, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    _, w, targets = losses.agsm_loss(
        pred=pred_ema, pred_ema=pred_ema, target=target, gamma_pos=1.0, gamma_neg=0.5, tau=0.4
    )
    assert targets.shape == (2, 5, 1, 2, 2) and w.shape == (2, 5)
    for i in range(2):
        mean_pred = (w[i].view(5, 1, 1, 1) * pred_ema[i]).sum(0)
        for j in range(5):
            gamma = 1.0 if i == j else -0.5
            torch.testing.assert_close(targets[i, j], target[i] + gamma * (pred_ema[i, j] - mean_pred))
    loss, _, _ = losses.agsm_loss(
        pred=pred_ema,
        pred_ema=pred_ema,
        target=target,
        gamma_pos=1.0,
        gamma_neg=0.5,
        tau=0.4,
    )
    per_pair = (pred_ema - targets).pow(2).flatten(2).mean(2)
    eye = torch.eye(2, 5, dtype=torch.bool)
    assert loss.item() == pytest.approx(per_pair[eye].mean().item() + per_pair[~eye].mean().item(), rel=1e-6)


# -----------------------------------------------------------------------------
# The authors' code where the papers are silent (AGSM train.py AGSMObjective.forward; SoftREPA's loss)


def their_agsm_objective(pred_v, ema_v, v, n_b, n_p, temp=0.1, guidance=1.0, neg_guidance=1.0):
    """AGSMObjective.forward of the AGSM code, re-derived: inputs in ITS layout, prompt-major rows
    (prompt p, image b) -> p * n_b + b, reshaped to (n_p, n_b) and transposed to (b, p)."""

    def to_bp(x):
        return x.reshape(n_p, n_b, *x.shape[-3:]).transpose(0, 1)

    v, pred_v, ema_v = to_bp(v), to_bp(pred_v), to_bp(ema_v)
    reward = -((v - ema_v) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    weight = torch.exp(reward / temp)
    weight = weight / weight.sum(dim=1, keepdim=True)
    target_guidance = ema_v - (weight * ema_v).sum(dim=1, keepdim=True)
    mask = torch.eye(n_b, n_p)
    pos = mask * ((pred_v - (v + guidance * target_guidance)) ** 2).mean(dim=(2, 3, 4))
    neg = (1 - mask) * ((pred_v - (v - neg_guidance * target_guidance)) ** 2).mean(dim=(2, 3, 4))
    error = pos.sum() / n_b + neg.sum() / (n_b * n_p - n_b)
    w = weight.view(n_b, n_p)
    pos_score = w.diagonal()
    neg_score = (w * (1 - mask)).max(dim=1).values
    return error, (pos_score > neg_score).float().mean(), (pos_score - neg_score).mean()


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-sd1.5"])
def test_agsm_step_equals_the_authors_objective_on_a_tiny_model(family):
    """One AGSM step of ours (pair matrix row-major, psi+ on the diagonal through the hooks) against the
    re-derived AGSMObjective.forward fed the same model in the authors' prompt-major layout: the same loss,
    diagnostics and token gradients. One t and one eps for the step, as their loop draws them."""
    import models
    import softtokens

    bb = backbones.build_tiny(family)
    pair = softtokens.make_tokens(bb, "agsm")
    with torch.no_grad():  # EMA tokens away from the live ones, so w is not uniform
        for s in (pair.ema_pos, pair.ema_neg):
            s.tokens.normal_(0, 0.5)
    B = 3
    images = torch.randn(B, 3, 16, 16)
    x0 = models.encode_images(bb, images, mode=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=g).expand_as(x0)  # one eps for the step
    u = torch.full((B,), 0.6)  # one t for the step
    x_t, timesteps = models.add_noise(bb, x0, noise, u)
    target = models.target(bb, x0, noise)
    cond = models.encode_prompts(bb, ["a red circle", "two blue squares", "a green triangle above a white square"])
    handle = softtokens.attach_tokens(bb, pair.sets)
    grads = []
    try:
        for layout in ("ours", "theirs"):
            pair.zero_grad(set_to_none=True)
            if layout == "ours":  # row i * B + j: image i, caption j
                rows, cols = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
            else:  # row p * B + b: prompt p, image b
                rows, cols = torch.arange(B).repeat(B), torch.arange(B).repeat_interleave(B)
            matched = rows == cols
            args = (x_t[rows], timesteps[rows], models.index_cond(cond, cols))
            with torch.no_grad(), handle.rows(torch.where(matched, softtokens.EMA_POS, softtokens.EMA_NEG)):
                pred_ema = models.denoise(bb, *args)
            with handle.rows(torch.where(matched, softtokens.POS, softtokens.NEG)):
                pred = models.denoise(bb, *args)
            if layout == "ours":
                shape = (B, B) + tuple(x0.shape[1:])
                loss, w, _ = losses.agsm_loss(
                    pred=pred.view(shape),
                    pred_ema=pred_ema.view(shape),
                    target=target,
                    gamma_pos=1.0,
                    gamma_neg=1.0,
                    tau=0.1,
                )
                win_rate, margin = losses.agsm_diagnostics(w)
            else:
                loss, win_rate, margin = their_agsm_objective(pred, pred_ema, target[rows], B, B)
            loss.backward()
            grads.append([p.grad.clone() for p in pair.trainable()])
            if layout == "ours":
                ours = (loss.item(), win_rate.item(), margin.item())
            else:
                theirs = (loss.item(), win_rate.item(), margin.item())
    finally:
        handle.remove()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert abs(ours[2]) > 0  # the weights were not uniform: the test saw the softmax


def test_agsm_default_temperature_is_the_codes():
    """The AGSM code: w = softmax(-mse.mean(C,H,W) / 0.1). Our default tau is that 0.1."""
    import inspect

    assert inspect.signature(losses.agsm_loss).parameters["tau"].default == 0.1
    pred_ema, target = example(seed=8)
    _, w, _ = losses.agsm_loss(
        pred=pred_ema,
        pred_ema=pred_ema,
        target=target,
    )
    errors = losses.pair_errors(pred_ema, target)
    torch.testing.assert_close(w, torch.softmax(-errors / 0.1, dim=1))


def test_duplicate_captions_are_no_negatives():
    captions = ["a red circle", "two blue squares", "a red circle"]
    exclude = losses.duplicates(captions, captions)
    assert exclude.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    pred, target = example(seed=9)
    errors = losses.pair_errors(pred, target)
    # SoftREPA: pair (0, 2) and (2, 0) leave the softmax; by hand, row 0 competes with column 1 only
    logits = 4.0 * torch.exp(-errors / 0.07)  # eq. 13 at the defaults (scale 4, tau 0.07)
    by_hand = []
    for i, keep in enumerate(([0, 1], [0, 1, 2], [1, 2])):
        row = logits[i, keep]
        by_hand.append(-(row[keep.index(i)] - torch.logsumexp(row, 0)))
    assert losses.softrepa_loss(errors=errors, exclude=exclude).item() == pytest.approx(
        torch.stack(by_hand).mean().item(), rel=1e-6
    )
    assert losses.softrepa_loss(errors=errors, exclude=exclude).item() != pytest.approx(
        losses.softrepa_loss(errors=errors).item()
    )
    # AGSM: no weight in the Plackett-Luce softmax, no guidance and no psi- loss for a duplicate
    _, w, targets = losses.agsm_loss(
        pred=pred, pred_ema=pred, target=target, gamma_pos=1.0, gamma_neg=1.0, exclude=exclude
    )
    assert w[0, 2] == 0 and w[2, 0] == 0 and torch.allclose(w.sum(1), torch.ones(3))
    torch.testing.assert_close(targets[0, 2], target[0].float())
    loss, _, _ = losses.agsm_loss(pred=pred, pred_ema=pred, target=target, exclude=exclude)
    per_pair = (pred - targets).pow(2).flatten(2).mean(2)
    negatives = per_pair[~torch.eye(3, dtype=torch.bool) & ~exclude]
    assert loss.item() == pytest.approx(per_pair.diagonal().mean().item() + negatives.mean().item(), rel=1e-6)
    # the accuracy: a duplicate does not compete
    tied = torch.tensor([[0.1, 0.5, 0.1], [0.9, 0.2, 0.8], [0.3, 0.6, 0.3]])
    assert losses.classifier_accuracy(tied).item() == pytest.approx(1 / 3)
    assert losses.classifier_accuracy(tied, exclude).item() == pytest.approx(1.0)


def test_agsm_plain_sum_is_alg1_line_12():
    pred, target = example(seed=10)
    code, _, _ = losses.agsm_loss(pred=pred, pred_ema=pred, target=target, gamma_pos=1.0, gamma_neg=0.1)
    literal, _, _ = losses.agsm_loss(
        pred=pred, pred_ema=pred, target=target, gamma_pos=1.0, gamma_neg=0.1, plain_sum=True
    )
    _, _, targets = losses.agsm_loss(pred=pred, pred_ema=pred, target=target, gamma_pos=1.0, gamma_neg=0.1)
    per_pair = (pred - targets).pow(2).flatten(2).mean(2)
    eye = torch.eye(3, dtype=torch.bool)
    assert literal.item() == pytest.approx(per_pair.sum().item(), rel=1e-6)
    assert code.item() == pytest.approx(per_pair[eye].mean().item() + per_pair[~eye].mean().item(), rel=1e-6)


def test_agsm_diagnostics_by_hand():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    win_rate, margin = losses.agsm_diagnostics(w)
    assert win_rate.item() == pytest.approx(2 / 3)
    assert margin.item() == pytest.approx(((0.5 - 0.3) + (0.35 - 0.4) + (0.8 - 0.1)) / 3)
