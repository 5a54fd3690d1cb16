"""
losses.py: every training loss of the two papers, on the B x B pair matrix.

A training step draws B images x_0^i and their B captions c^j. Every image is paired with every
caption: pair (i, j) is matched (positive, D+) when i == j and mismatched (negative, D-) otherwise.
(With train.py --gather-text the other ranks' captions are appended as extra negatives: a B x K
matrix, K > B, with the matched pairs still on the diagonal of its first B columns.)
Both papers use one noise level t_i and one noise eps_i per image row, shared by all B captions of
that row (SoftREPA eq. 14; AGSM Alg. 1 lines 4-6), so the only thing that differs along a row is
the caption. Shapes used throughout:

    pred     (B, B, C, H, W)  the denoiser's output for pair (i, j): image i noised, caption j
    target   (B, C, H, W)     eps_i (DSM) or v_i = eps_i - x0_i (flow matching) of image row i
    errors   (B, B)           pair_errors(pred, target): mean squared error of each pair

Denoising score matching (DDPM, SD1.5/SDXL): || eps_theta(x_t, t, c) - eps ||^2, x_t = sqrt(abar_t) x0
+ sqrt(1 - abar_t) eps. Conditional flow matching (SD3): || v_theta(x_t, t, c) - (eps - x0) ||^2,
x_t = (1 - t) x0 + t eps (SoftREPA eq. 11; AGSM eqs. 38-39). Both are the same code here: the target
is chosen by models.target.
"""

import torch
import torch.nn.functional as F


def pair_errors(pred, target):
    """(B, B) mean squared error over C, H, W of each pair against its row's target.
    The per-element mean (not the sum of the papers' ||.||^2) is what SoftREPA's released code uses;
    it keeps the numbers independent of the latent size, and the temperatures below absorb the scale."""
    diff = pred.float() - target.float().unsqueeze(1)
    return diff.pow(2).flatten(2).mean(dim=2)


def matched(errors):
    return errors.diagonal()


def mismatched(errors):
    return errors[~torch.eye(*errors.shape, dtype=torch.bool, device=errors.device)]


def classifier_accuracy(errors):
    """In-batch diffusion classifier: does the matched caption give the lowest error in its row?
    (SoftREPA eqs. 15-18: the denoising error is a log-likelihood up to a constant, so argmin_j is the
    maximum-likelihood caption.)"""
    rows = torch.arange(errors.shape[0], device=errors.device)
    return (errors.argmin(dim=1) == rows).float().mean()


# -----------------------------------------------------------------------------
# Plain score / flow matching on the matched pairs: the "dsm" baseline (AGSM Table 4 (i)).

def dsm_loss(errors):
    return matched(errors).mean()


# -----------------------------------------------------------------------------
# SoftREPA (eqs. 9-14).
#
# Eq. 9 is the CLIP-style contrastive loss over the captions of each image,
#     L = -1/B sum_i log( exp(l(x_i, y_i)) / sum_j exp(l(x_i, y_j)) ),
# i.e. a cross-entropy with logits l(x_i, y_j) and label i. The similarity is the denoising error
# passed through exp (eqs. 10-11, 13):  l(x, y) = exp(-err(x, y) / tau(t)),  where the exp bounds the
# logits in (0, 1] (unbounded logits -err were unstable, sec. 3). The released code multiplies by a
# scale (4) so that the logits span a useful range, uses a constant tau = 0.07, and can learn both;
# it adds `dweight` times the plain DSM/FM loss of the matched pairs (10 for SD1.5/SDXL, 0 for SD3;
# SoftREPA app. B and Table 6).

def softrepa_logits(errors, tau=0.07, scale=4.0):
    return scale * torch.exp(-errors / tau)


def softrepa_loss(errors, tau=0.07, scale=4.0, dweight=0.0):
    logits = softrepa_logits(errors, tau, scale)
    labels = torch.arange(errors.shape[0], device=errors.device)
    contrastive = F.cross_entropy(logits, labels)            # eq. 14
    return contrastive + dweight * dsm_loss(errors)


# -----------------------------------------------------------------------------
# AGSM (eqs. 7-17, Alg. 1).
#
# Alignment as a Plackett-Luce choice among the B captions of an image (eq. 7):
#     p(z = 1 | x_t, c) = exp(r(x_t, c)) / sum_i exp(r(x_t, c^i)).
# The reward is a scaled denoising error of the EMA tokens (eq. 14, App. B):
#     r(x_t, c) = -A(t)/2 || eps_theta^{hat psi}(x_t, t, c) - eps ||^2.
# Tilting the data distribution by p(z=1|.)^{+gamma+} (matched) or p(z=1|.)^{-gamma-} (mismatched)
# (eq. 9) adds gamma_z grad log p(z=1|x_t, c) to the target score (eq. 11), and the PL gradient is
# (eq. 13)  grad log p(z=1|x_t,c) = grad r(x_t,c) - sum_i w_i grad r(x_t,c^i),  w_i = softmax_i r.
# With the Jacobian of the EMA prediction dropped (App. C, eq. 31) and the same eps in every term
# (it cancels, eq. 33), this is -A(t) (eps_ema(c) - sum_i w_i eps_ema(c^i)). Turning scores into
# noise predictions (score = -eps / sqrt(1 - abar_t)) gives the regression target (eqs. 15, 37):
#     eps_tgt(i, j) = eps_i + gamma_ij * tilde A(t) * Delta_ij,
#     Delta_ij      = eps_ema(i, j) - sum_k w_ik eps_ema(i, k)                      (Alg. 1 line 9)
#     w_ik          = softmax_k( -err_ema(i, k) / tau )                              (Alg. 1 line 8)
#     gamma_ii = +gamma+,  gamma_ij = -gamma- (i != j)                              (eq. 11, Alg. 1 l. 10)
# and psi+ / psi- regress their predictions onto it (eq. 17). For flow models the same steps with
# the Euler transition x_t = x_{t+d} - d v as the Gaussian "reverse step" give eq. 16 (App. D):
#     v_tgt(i, j) = v_i + gamma_ij * B(t) * (v_ema(i, j) - sum_k w_ik v_ema(i, k)).
# (App. D evaluates the EMA velocity at x_{t+d}; as d -> 0 that is the x_t we have.)
#
# Normalisation of the error in the softmax: the paper writes ||.||^2 (a sum over all elements) and
# leaves its scale to A(t). We use the per-element mean, as SoftREPA's code does, divided by a
# temperature tau. tau = 2 / (C*H*W) reproduces the literal Alg. 1 with A(t) = 1.

def guidance_weight_eps(t, alphas_cumprod=None):
    """tilde A(t) of eq. 15, = lambda_t beta_t sqrt(1 - abar_t) / (alpha_t (1 - abar_{t-1})) (eq. 37).
    The paper chooses lambda_t so that tilde A(t) = 1 in every experiment (sec. 4); so do we. To try
    another schedule, return it here as a (B,) tensor for DDPM timesteps t."""
    return torch.ones_like(t, dtype=torch.float32)


def guidance_weight_flow(t):
    """B(t) of eq. 16, = K(t) lambda_t d / sigma_{t+d}^2 (eq. 51). Set to 1 like tilde A(t)."""
    return torch.ones_like(t, dtype=torch.float32)


def plackett_luce_weights(errors_ema, tau):
    """w_ij = softmax_j(r_ij) with r_ij = -err_ema(i, j) / tau (eqs. 7, 14; Alg. 1 line 8)."""
    return torch.softmax(-errors_ema / tau, dim=1)


def agsm_targets(pred_ema, target, timesteps, prediction, gamma_pos=1.0, gamma_neg=1.0, tau=0.07,
                 bradley_terry=False):
    """The alignment-guided targets (B, B, C, H, W) of eq. 15 / 16 for every pair, and the weights w."""
    B, K = pred_ema.shape[:2]
    pred_ema = pred_ema.float()
    errors_ema = pair_errors(pred_ema, target)
    if bradley_terry:
        delta, w = bradley_terry_delta(pred_ema, errors_ema, tau)
    else:
        w = plackett_luce_weights(errors_ema, tau)                          # (B, B)
        weighted_mean = torch.einsum("ik,ik...->i...", w, pred_ema)         # sum_k w_ik pred_ema(i, k)
        delta = pred_ema - weighted_mean.unsqueeze(1)                       # Delta_ij (eq. 13 / 33)
    eye = torch.eye(B, K, dtype=torch.bool, device=pred_ema.device)
    gamma = torch.where(eye, gamma_pos, -gamma_neg).to(pred_ema)            # gamma_z (eq. 11)
    scale = guidance_weight_flow(timesteps) if prediction == "flow" else guidance_weight_eps(timesteps)
    shape = (B, K) + (1,) * (pred_ema.dim() - 2)
    guidance = (gamma * scale.to(pred_ema).view(B, 1)).view(shape) * delta
    return target.float().unsqueeze(1) + guidance, w


def bradley_terry_delta(pred_ema, errors_ema, tau):
    """AGSM Table 7's pairwise alternative: each mismatched pair (i, j) is a two-way choice between
    c^i and c^j, so its weights are a softmax over {i, j} only. A mismatched pair's Delta comes from its
    own comparison; the matched pair's Delta is the mean over its B - 1 comparisons. (The paper gives
    no formula; this is the PL derivation above restricted to two candidates.)"""
    B, K = pred_ema.shape[:2]
    rows = torch.arange(B, device=pred_ema.device)
    own = errors_ema[rows, rows].unsqueeze(1).expand(B, K)                    # err(i, i) beside err(i, j)
    w_other = torch.softmax(torch.stack([-own, -errors_ema], dim=-1) / tau, dim=-1)[..., 1]   # (B, B)
    positive = pred_ema[rows, rows].unsqueeze(1)                              # (B, 1, C, H, W)
    shape = (B, K) + (1,) * (pred_ema.dim() - 2)
    w2 = w_other.view(shape)
    pair_mean = (1 - w2) * positive + w2 * pred_ema                           # two-candidate weighted mean
    delta_neg = pred_ema - pair_mean                                          # Delta for (i, j), j != i
    delta_pos_each = positive - pair_mean                                     # the matched pair vs c^j
    off = ~torch.eye(B, K, dtype=torch.bool, device=pred_ema.device)
    delta_pos = (delta_pos_each * off.view(shape)).sum(1) / max(K - 1, 1)
    delta = delta_neg.clone()
    delta[rows, rows] = delta_pos
    return delta, w_other


def agsm_loss(pred, pred_ema, target, timesteps, prediction, gamma_pos=1.0, gamma_neg=1.0, tau=0.07,
              bradley_terry=False):
    """Eq. 17: E_{D+} || pred_psi+ - tgt ||^2 + E_{D-} || pred_psi- - tgt ||^2, target detached.
    `pred` holds psi+ predictions on the diagonal and psi- ones elsewhere (one batched forward, hooks.py);
    `pred_ema` the same with the EMA tokens, computed without gradient."""
    with torch.no_grad():
        targets, _ = agsm_targets(pred_ema, target, timesteps, prediction, gamma_pos, gamma_neg, tau,
                                  bradley_terry)
    per_pair = (pred.float() - targets).pow(2).flatten(2).mean(dim=2)         # (B, K)
    loss = matched(per_pair).mean()
    if per_pair.shape[1] > 1:
        loss = loss + mismatched(per_pair).mean()
    return loss
