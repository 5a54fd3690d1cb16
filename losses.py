"""
losses.py: every training loss of the two papers, on the B x B pair matrix.

A training step draws B images x_0^i and their B captions c^j. Every image is paired with every
caption: pair (i, j) is matched (positive, D+) when i == j and mismatched (negative, D-) otherwise.
(With train.py --gather-text the other ranks' captions are appended as extra negatives: a B x K
matrix, K > B, with the matched pairs still on the diagonal of its first B columns.)
Along a row only the caption differs: the row's image is noised once and every caption sees the same
x_t. (Both authors' codes go further and draw one t and one eps for the whole step, every image alike;
AGSM Alg. 1 lines 4-5 draw them once per step as well. train.py follows that by default and keeps one
draw per image row as --noise-per-row; the losses below work with either.)
Captions can repeat within a batch (a small dataset, or the shapes world): a "mismatched" pair whose
caption equals the row's own is really matched. `duplicates` marks such pairs, and every loss here
leaves them out of its negatives. Shapes used throughout:

    pred     (B, B, C, H, W)  the denoiser's output for pair (i, j): image i noised, caption j
    target   (B, C, H, W)     eps_i (DSM) or v_i = eps_i - x0_i (flow matching) of image row i
    errors   (B, B)           pair_errors(pred, target): mean squared error of each pair

Denoising score matching (DDPM, SD1.5/SDXL): || eps_theta(x_t, t, c) - eps ||^2, x_t = sqrt(abar_t) x0
+ sqrt(1 - abar_t) eps. Conditional flow matching (SD3): || v_theta(x_t, t, c) - (eps - x0) ||^2,
x_t = (1 - t) x0 + t eps (SoftREPA eq. 11; AGSM eqs. 38-39). Both are the same code here: the target
is chosen by models.target.
"""

import re

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The losses, declared once: train.py's --loss choices, the recipe's defaults (recipe.py), the step's branches
# (step.train_step: one per name) and the lab's sweeps all read this table. Facts, not code:
#   pairs      "matrix": every image with every caption (B x K pairs); "diagonal": the B matched pairs only
#   token_sets "one": one set of soft tokens; "pair": AGSM's psi+ and psi- and their EMA copies
#              (softtokens.PairTokens), which no paper defines on LoRA adapters or the whole denoiser
#   tau        the temperature of the error softmax in the authors' codes (SoftREPA 0.07, AGSM 0.1)
#   recipe     the entry of families.FAMILIES holding the paper's batch and steps
#   paper_run  (iterations, scheduler period) of the authors' runs, for the schedule rule (recipe.py)
#              (SoftREPA: 30k stepped every 500; AGSM: 100k stepped every --num_iter = 1000, as its
#              scripts/train_coco.sh sets it for SD3 and SD1.5)
# Adding a loss: its function below, its entry here, its branch in step.train_step, and its test.
LOSSES = {
    "dsm": dict(pairs="diagonal", token_sets="one", tau=None, recipe="agsm", paper_run=(100000, 1000)),
    "softrepa": dict(pairs="matrix", token_sets="one", tau=0.07, recipe="softrepa", paper_run=(30000, 500)),
    "agsm": dict(pairs="matrix", token_sets="pair", tau=0.1, recipe="agsm", paper_run=(100000, 1000)),
}
DEFAULT_LOSS = "agsm"  # train.py --loss when neither the flag nor a resumed checkpoint says


def pair_errors(pred, target):
    """(B, K) mean squared error over C, H, W of each pair against its row's target.
    The per-element mean (not the sum of the papers' ||.||^2) is what both released codes use
    (F.mse_loss(...).mean(dim=(2, 3, 4))); it keeps the numbers independent of the latent size, and the
    temperatures below absorb the scale."""
    diff = pred.float() - target.float().unsqueeze(1)
    return diff.pow(2).flatten(2).mean(dim=2)


def duplicates(row_captions, column_captions):
    """(B, K) bool: pair (i, j) is off the diagonal but its caption equals row i's own caption."""
    same = torch.tensor([[a == b for b in column_captions] for a in row_captions])
    return same & ~torch.eye(len(row_captions), len(column_captions), dtype=torch.bool)


def matched_mask(n_rows, K, rows=None, device=None):
    """(n, K) bool: pair (r, j) is matched. `rows` are the global indices of the n image rows at hand
    (train.py --rows-per-forward runs a few rows of the B x K matrix at a time); None: all B rows,
    whose matched pairs are the diagonal."""
    rows = torch.arange(n_rows, device=device) if rows is None else rows.to(device)
    return torch.arange(K, device=device).unsqueeze(0) == rows.unsqueeze(1)


def _off_diagonal(errors, exclude=None, rows=None):
    off = ~matched_mask(errors.shape[0], errors.shape[1], rows, errors.device)
    return off if exclude is None else off & ~exclude.to(errors.device)


def matched(errors, rows=None):
    """The matched pair's value of each row: the diagonal, or column rows[r] of row r."""
    rows = torch.arange(errors.shape[0], device=errors.device) if rows is None else rows.to(errors.device)
    return errors[torch.arange(errors.shape[0], device=errors.device), rows]


def mismatched(errors, exclude=None):
    return errors[_off_diagonal(errors, exclude)]


def classifier_accuracy(errors, exclude=None):
    """In-batch diffusion classifier: does the matched caption give a strictly lower error than every
    other caption of its row? (SoftREPA eqs. 15-18: the denoising error is a log-likelihood up to a
    constant, so argmin_j is the maximum-likelihood caption.) A tie counts as wrong, so a text-blind
    model scores 0 rather than 1/K by the luck of argmin; excluded (duplicate) captions do not compete."""
    others = errors.masked_fill(~_off_diagonal(errors, exclude), float("inf"))
    return strictly_lowest(matched(errors), others).float().mean()


def strictly_lowest(true_errors, other_errors):
    """(R,) bool: is each row's true error strictly below all its others (R, K-1)? The one tie rule of
    both diffusion classifiers (this in-batch one, and classifier.py's held-out one)."""
    return true_errors < other_errors.min(dim=1).values


# -----------------------------------------------------------------------------
# Plain score / flow matching on the matched pairs: the "dsm" baseline (AGSM Table 4 (i)).


def dsm_loss(*, errors, batch_rows=None):
    """The matched pairs' mean squared error over the step's B image rows, || pred(x_t^i, c^i) - target_i ||^2.
    `errors` (n, 1) are the pair errors of the n rows at hand (the step runs only the matched pairs); a
    chunk of rows contributes its sum / B, so the chunks of one step add up to the mean over all B."""
    return errors[:, 0].sum() / (errors.shape[0] if batch_rows is None else batch_rows)


# -----------------------------------------------------------------------------
# SoftREPA (eqs. 9-14).
#
# Eq. 9 is the CLIP-style contrastive loss over the captions of each image,
#     L = -1/B sum_i log( exp(l(x_i, y_i)) / sum_j exp(l(x_i, y_j)) ),
# i.e. a cross-entropy with logits l(x_i, y_j) and label i. The similarity is the denoising error
# passed through exp (eqs. 10-11, 13):  l(x, y) = exp(-err(x, y) / tau(t)),  where the exp bounds the
# logits in (0, 1] (unbounded logits -err were unstable, sec. 3). The released code multiplies by a
# scale (4) so that the logits span a useful range and uses a constant tau = 0.07. (Its ContrastiveLoss
# wraps tau and the scale in nn.Parameter, but the optimizer receives only the soft tokens, so both stay
# constant; here they are plain numbers.) It adds `dweight` times the plain DSM/FM loss of the matched
# pairs (10 for SD1.5/SDXL, 0 for SD3; SoftREPA app. B and Table 6).


def softrepa_loss(*, errors, tau=0.07, scale=4.0, dweight=0.0, exclude=None, rows=None, batch_rows=None):
    """SoftREPA eqs. 11-14 for the n image rows at hand (global indices `rows` of the step's B; None: all of
    them). `errors` (n, K) are eq. 11's pair errors, err(i, j) = || v_theta(x_t^i, t, c^j) - v_i ||^2
    (pair_errors). Each row's loss is its cross-entropy over its K captions plus dweight times its matched
    error; the step's loss is their mean over the B rows (eq. 14), so a chunk of rows contributes sum / B and
    the chunks add up to the whole (--rows-per-forward)."""
    # eq. 13: the logits l(x_i, c_j) = scale * exp(-err(i, j) / tau), bounded in (0, scale]
    logits = scale * torch.exp(-errors / tau)
    if exclude is not None:  # a duplicate caption is no negative: out of the softmax's denominator
        logits = logits.masked_fill(exclude.to(logits.device), float("-inf"))
    # eqs. 9, 14: the cross-entropy of each row over its captions, the matched caption as the label
    labels = torch.arange(errors.shape[0], device=errors.device) if rows is None else rows.to(errors.device)
    row_losses = F.cross_entropy(logits, labels, reduction="none")
    # app. B: plus dweight times the matched pair's plain DSM / FM error
    row_losses = row_losses + dweight * matched(errors, rows)
    return row_losses.sum() / (errors.shape[0] if batch_rows is None else batch_rows)


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
# The softmax's temperature. The AGSM code (train.py, AGSMObjective.forward) computes the reward as the
# per-element mean, reward = -mse(v, v_ema).mean(C, H, W), and weights softmax(reward / 0.1): tau = 0.1,
# our default. Alg. 1 line 8 writes w = softmax(-||eps_ema - eps||^2), the SUM over the C*H*W elements
# with no temperature, which is the per-element mean at tau = 1 / (C*H*W) (train.py --paper-tau). Eq. 14
# with A(t) = 1 would add a 1/2, tau = 2 / (C*H*W); Alg. 1 has none. (The per-element scale matters:
# with tau = 0.1 and error gaps of a few hundredths the weights are nearly uniform; with the sum they
# are nearly one-hot.)


def bradley_terry_delta(pred_ema, errors_ema, tau, rows=None):
    """AGSM Table 7's pairwise alternative: each mismatched pair (i, j) is a two-way choice between
    c^i and c^j, so its weights are a softmax over {i, j} only. A mismatched pair's Delta comes from its
    own comparison; the matched pair's Delta is the mean over its K - 1 comparisons. (The paper gives
    no formula; this is the PL derivation above restricted to two candidates.)"""
    n, K = pred_ema.shape[:2]
    local = torch.arange(n, device=pred_ema.device)
    rows = local if rows is None else rows.to(pred_ema.device)  # the matched column of each row
    own = errors_ema[local, rows].unsqueeze(1).expand(n, K)  # err(i, i) beside err(i, j)
    w_other = torch.softmax(torch.stack([-own, -errors_ema], dim=-1) / tau, dim=-1)[..., 1]  # (n, K)
    positive = pred_ema[local, rows].unsqueeze(1)  # (n, 1, C, H, W)
    shape = (n, K) + (1,) * (pred_ema.dim() - 2)
    w2 = w_other.view(shape)
    pair_mean = (1 - w2) * positive + w2 * pred_ema  # two-candidate weighted mean
    delta_neg = pred_ema - pair_mean  # Delta for (i, j), j != i
    delta_pos_each = positive - pair_mean  # the matched pair vs c^j
    off = ~matched_mask(n, K, rows, pred_ema.device)
    delta_pos = (delta_pos_each * off.view(shape)).sum(1) / max(K - 1, 1)
    delta = delta_neg.clone()
    delta[local, rows] = delta_pos
    return delta, w_other


def negative_count(B, K, exclude=None):
    """The number of mismatched pairs of the whole B x K matrix that count as negatives (AGSM's
    mismatched mean divides by it, also when the rows go through the denoiser a few at a time)."""
    return B * K - B - (0 if exclude is None else int(exclude.sum()))


def agsm_loss(
    *,
    pred,
    pred_ema,
    target,
    gamma_pos=1.0,
    gamma_neg=1.0,
    tau=0.1,
    bradley_terry=False,
    exclude=None,
    plain_sum=False,
    rows=None,
    batch_rows=None,
    n_negatives=None,
):
    """AGSM Alg. 1 lines 8-12 for the n image rows at hand. Returns (loss, weights w (n, K), targets).

    `pred` (n, K, C, H, W) holds psi+ predictions on the matched pairs and psi- ones elsewhere (one batched
    forward, hooks.py); `pred_ema` the same pairs with the EMA tokens, without gradient; `target` (n, C, H, W)
    each row's eps_i or v_i. `rows`, `batch_rows`, `n_negatives`: these rows' global indices, the step's B,
    and the negative count of the whole matrix (negative_count); None: these rows are the whole matrix. Each
    row's targets come from its own pairs alone, which lets the step run the rows a few at a time."""
    n, K = pred.shape[:2]
    shape = (n, K) + (1,) * (pred.dim() - 2)  # to broadcast a (n, K) number over C, H, W
    with torch.no_grad():  # lines 8-11 build constants: the targets
        pred_ema = pred_ema.float()
        errors_ema = pair_errors(pred_ema, target)  # err_ema(i, k), per-element means as both codes
        if bradley_terry:  # AGSM Table 7: pairwise choices instead of one choice among the K captions
            delta, w = bradley_terry_delta(pred_ema, errors_ema, tau, rows)
        else:
            # line 8: w_ik = softmax_k(r_ik), the reward r_ik = -err_ema(i, k) / tau (eqs. 7, 14); a duplicate
            # caption is one choice however often it appears in the batch, so its copies get no weight
            rewards = -errors_ema / tau
            if exclude is not None:
                rewards = rewards.masked_fill(exclude.to(rewards.device), float("-inf"))
            w = torch.softmax(rewards, dim=1)
            # line 9: Delta_ij = pred_ema(i, j) - sum_k w_ik pred_ema(i, k)   (eqs. 13 / 33)
            delta = pred_ema - torch.einsum("ik,ik...->i...", w, pred_ema).unsqueeze(1)
        # line 10: gamma_ij = +gamma+ on the matched pair, -gamma- on the mismatched ones (eq. 11); a duplicate
        # caption gets no guidance
        gamma = torch.where(matched_mask(n, K, rows, pred.device), gamma_pos, -gamma_neg).to(pred_ema)
        if exclude is not None:
            gamma = gamma.masked_fill(exclude.to(gamma.device), 0.0)
        # line 11: target_ij = eps_i (or v_i) + gamma_ij * A(t) * Delta_ij (eqs. 15, 16), with A(t) = B(t) = 1:
        # the paper chooses lambda_t so that the scale is 1 in every experiment (sec. 4), and so does its code
        targets = target.float().unsqueeze(1) + gamma.view(shape) * delta
    # line 12: psi+ (matched) and psi- (mismatched) regress onto the targets, eq. 17's two expectations
    pair_losses = (pred.float() - targets).pow(2).flatten(2).mean(dim=2)  # (n, K)
    batch_rows = n if batch_rows is None else batch_rows
    n_negatives = negative_count(n, K, exclude) if n_negatives is None else n_negatives
    negatives = pair_losses.masked_fill(~_off_diagonal(pair_losses, exclude, rows), 0.0).sum(dim=1)  # (n,)
    if plain_sum:  # Alg. 1 line 12 as written: one plain sum over all pairs (psi- weighs K - 1 times more)
        row_losses = matched(pair_losses, rows) + negatives
    else:  # the code (AGSMObjective.forward): the matched mean plus the mismatched mean, as eq. 17
        row_losses = matched(pair_losses, rows) / batch_rows + negatives / max(n_negatives, 1)
    return row_losses.sum(), w, targets


def agsm_diagnostics(w, exclude=None, rows=None):
    """The AGSM code's two training diagnostics, from the Plackett-Luce weights w (B, K): the win rate,
    how often the matched caption gets more weight than the strongest negative, and the mean margin
    w_ii - max_{j != i} w_ij. A text-blind model has margin 0 and wins by chance."""
    negatives = w.masked_fill(~_off_diagonal(w, exclude, rows), 0.0).max(dim=1).values
    margin = matched(w, rows) - negatives
    return (margin > 0).float().mean(), margin.mean()


# -----------------------------------------------------------------------------
# SoftREPA's counting loss (appendix D, Table 7's last row). Tokens trained on layers 1-5 of SD3 drew too
# many objects (GenEval counting 0.56 -> 0.29); adding "a mean squared error between the predicted object
# count, derived from denoised images, and the ground-truth labels" from a YOLOv8 detector brought it to
# 0.59. The appendix gives no formula; ours, step by step:
#   1. the count and the object a caption asks for: "three red squares" -> (3, "square")  (prompt_count)
#   2. the one-step prediction of the clean latent from the step's own forward (one_step_x0):
#        flow:  x_t = (1 - s) x0 + s eps,  v = eps - x0     =>  x0_hat = x_t - s v
#        DDPM:  x_t = sqrt(abar) x0 + sqrt(1 - abar) eps      =>  x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)
#   3. decoded by the frozen VAE *with* gradient, and a differentiable count of the object in it: a
#      detector's hard count (boxes over a threshold) has no gradient, so we add up probabilities -- the
#      expected number of detections of that class (a counter's soft_count: counting.DetectorCounter, or
#      the shapes world's ShapesCounter in shapes/checker.py)
#   4. (soft count - asked count)^2 on the matched pairs, added to the step's loss with weight
#      --count-weight; a caption without a count contributes nothing.

NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
PHRASE_ENDS = {
    "and",
    "on",
    "in",
    "with",
    "to",
    "of",
    "at",
    "near",
    "next",
    "above",
    "below",
    "under",
    "behind",
    "beside",
    "left",
    "right",
    "that",
    "which",
    "while",
    ",",
    ".",
}


def prompt_count(caption):
    """(count, noun) of the first "<number> ... <noun>" in a caption, or None. The noun is the first plural
    word of the phrase after the number ("three red squares" -> square; "two cats on a mat" -> cat), or
    its last word ("two people" -> people). A heuristic, exact on the shapes world's captions and
    GenEval's counting prompts ("a photo of four dogs"); a phrase it misreads asks the counter for
    an object it may not know, and a counter returns NaN (no loss) for a noun outside its labels."""
    words = re.findall(r"[a-z]+|\d+|[,.]", caption.lower())
    for i, word in enumerate(words):
        count = int(word) if word.isdigit() else NUMBER_WORDS.get(word)
        if count is None:
            continue
        phrase = []
        for w in words[i + 1 :]:
            if w in PHRASE_ENDS:
                break
            phrase.append(w)
        if phrase:
            plural = [w for w in phrase if w.endswith("s") and len(w) > 3]
            noun = plural[0] if plural and count > 1 else phrase[-1]
            return count, singular(noun)
    return None


def singular(word):
    """Crude English singular: squares -> square, boxes -> box, buses -> bus, people stays."""
    for ending, replacement in (
        ("ies", "y"),
        ("sses", "ss"),
        ("shes", "sh"),
        ("ches", "ch"),
        ("xes", "x"),
        ("uses", "us"),
        ("s", ""),
    ):
        if word.endswith(ending) and not word.endswith("ss"):
            return word[: -len(ending)] + replacement
    return word


def one_step_x0(pred, x_t, timesteps, prediction, alphas_cumprod=None):
    """The clean latent the denoiser's output implies at this noise level (step 2 above)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    if prediction == "flow":
        sigma = (timesteps.float() / 1000).view(shape)
        return x_t.float() - sigma * pred.float()
    abar = alphas_cumprod.to(x_t.device)[timesteps.long()].float().view(shape)
    return (x_t.float() - (1 - abar).sqrt() * pred.float()) / abar.sqrt()


def count_row_losses(soft_counts, asked):
    """(n,) squared count errors; rows whose caption has no count (asked NaN) or whose object the counter
    does not know (soft count NaN) give 0."""
    known = torch.isfinite(asked) & torch.isfinite(soft_counts)
    # zeroed *before* the square: a NaN inside it would turn into a NaN gradient even where it is not chosen
    soft, asked = torch.where(known, soft_counts.float(), 0.0), torch.where(known, asked.float(), 0.0)
    return (soft - asked).pow(2)
