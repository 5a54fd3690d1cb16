"""losses.py against small hand-computed examples (SoftREPA eqs. 9-14, AGSM eqs. 7-17)."""
import math

import pytest
import torch

import losses


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
        expected += -math.log(math.exp(logits[i]) / sum(math.exp(l) for l in logits))
    expected /= 3
    assert math.isclose(losses.softrepa_loss(errors, tau, scale).item(), expected, rel_tol=1e-6)
    dsm = (0.10 + 0.12 + 0.15) / 3
    assert math.isclose(losses.softrepa_loss(errors, tau, scale, dweight=10.0).item(), expected + 10 * dsm,
                        rel_tol=1e-6)


def test_softrepa_prefers_matched_pairs():
    good = torch.tensor([[0.1, 0.5], [0.5, 0.1]])
    bad = torch.tensor([[0.5, 0.1], [0.1, 0.5]])
    assert losses.softrepa_loss(good) < losses.softrepa_loss(bad)


def test_classifier_accuracy():
    errors = torch.tensor([[0.1, 0.5, 0.4], [0.2, 0.3, 0.1], [0.9, 0.8, 0.7]])
    assert losses.classifier_accuracy(errors).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_agsm_with_zero_gamma_is_plain_matching(prediction):
    pred, target = example(seed=1)
    pred_ema = pred + 0.1 * torch.randn_like(pred)
    t = torch.tensor([10.0, 500.0, 990.0])
    loss = losses.agsm_loss(pred, pred_ema, target, t, prediction, gamma_pos=0.0, gamma_neg=0.0)
    errors = losses.pair_errors(pred, target)
    eye = torch.eye(3, dtype=torch.bool)
    assert loss.item() == pytest.approx(errors[eye].mean().item() + errors[~eye].mean().item(), rel=1e-6)


def test_agsm_delta_is_zero_when_all_texts_agree():
    _, target = example()
    same = torch.randn(3, 1, 2, 2, 2).expand(3, 3, 2, 2, 2)
    targets, w = losses.agsm_targets(same, target, torch.zeros(3), "epsilon", 1.0, 1.0)
    torch.testing.assert_close(targets, target.unsqueeze(1).expand_as(targets))
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_agsm_targets_term_by_term(prediction):
    """Eq. 15 (epsilon) / eq. 16 (flow) written out with loops, Alg. 1 lines 8-10."""
    pred_ema, target = example(seed=2)
    tau, gp, gn = 0.5, 1.0, 0.1
    targets, w = losses.agsm_targets(pred_ema, target, torch.zeros(3), prediction, gp, gn, tau)
    for i in range(3):
        errs = [((pred_ema[i, k] - target[i]) ** 2).mean() for k in range(3)]
        weights = torch.softmax(-torch.stack(errs) / tau, dim=0)
        torch.testing.assert_close(w[i], weights)
        mean_pred = sum(weights[k] * pred_ema[i, k] for k in range(3))
        for j in range(3):
            gamma = gp if i == j else -gn
            expected = target[i] + gamma * 1.0 * (pred_ema[i, j] - mean_pred)   # A~(t) = B(t) = 1
            torch.testing.assert_close(targets[i, j], expected)


def test_agsm_loss_regresses_onto_detached_targets():
    pred, target = example(seed=3)
    pred = pred.clone().requires_grad_(True)
    pred_ema = pred.detach() + 0.05
    t = torch.zeros(3)
    loss = losses.agsm_loss(pred, pred_ema, target, t, "flow", 1.0, 0.1, tau=0.5)
    loss.backward()
    targets, _ = losses.agsm_targets(pred_ema, target, t, "flow", 1.0, 0.1, tau=0.5)
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
    pl, _ = losses.agsm_targets(pred_ema, target, torch.zeros(2), "epsilon", 1.0, 1.0, tau=0.3)
    bt, _ = losses.agsm_targets(pred_ema, target, torch.zeros(2), "epsilon", 1.0, 1.0, tau=0.3, bradley_terry=True)
    torch.testing.assert_close(pl, bt)


def test_bradley_terry_differs_from_plackett_luce_with_more_texts():
    pred_ema, target = example(B=3, seed=5)
    pl, _ = losses.agsm_targets(pred_ema, target, torch.zeros(3), "epsilon", tau=0.3)
    bt, _ = losses.agsm_targets(pred_ema, target, torch.zeros(3), "epsilon", tau=0.3, bradley_terry=True)
    assert not torch.allclose(pl, bt)


def test_dsm_loss_is_the_matched_mean():
    errors = torch.tensor([[1.0, 9.0], [9.0, 3.0]])
    assert losses.dsm_loss(errors).item() == 2.0


def test_agsm_accepts_extra_gathered_negatives():
    """train.py --gather-text: B images x K captions, K > B, matched pairs on the first B columns' diagonal.
    Extra captions that predict exactly like an existing one only re-weight; the per-pair formula holds."""
    g = torch.Generator().manual_seed(6)
    pred_ema, target = torch.randn(2, 5, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    targets, w = losses.agsm_targets(pred_ema, target, torch.zeros(2), "epsilon", 1.0, 0.5, tau=0.4)
    assert targets.shape == (2, 5, 1, 2, 2) and w.shape == (2, 5)
    for i in range(2):
        mean_pred = (w[i].view(5, 1, 1, 1) * pred_ema[i]).sum(0)
        for j in range(5):
            gamma = 1.0 if i == j else -0.5
            torch.testing.assert_close(targets[i, j], target[i] + gamma * (pred_ema[i, j] - mean_pred))
    loss = losses.agsm_loss(pred_ema, pred_ema, target, torch.zeros(2), "epsilon", 1.0, 0.5, tau=0.4)
    per_pair = (pred_ema - targets).pow(2).flatten(2).mean(2)
    eye = torch.eye(2, 5, dtype=torch.bool)
    assert loss.item() == pytest.approx(per_pair[eye].mean().item() + per_pair[~eye].mean().item(), rel=1e-6)
