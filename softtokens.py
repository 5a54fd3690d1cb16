"""
softtokens.py: the learnable soft text tokens, their files, and attaching a file's tokens to a backbone.

SoftREPA eq. 12 gives each layer k (an MM-DiT block, or the UNet's chosen blocks) its own m soft
tokens, optionally time dependent:

    s^(k,t) = Embedding(k, t) = tokens[k] + time_table[bin(t), k]        in R^(m x d)

where t is the denoiser's timestep in [0, 1000] (SD3: sigma * 1000) and bin(t) = min(int(t), 999) // 10
picks one of 100 rows. The time row is added to every one of the layer's m tokens. This is exactly how
the authors' released tokens are used (the SoftREPA repository, github.com/softrepa/SoftREPA): their
`dc_tokens` is our `tokens` and the rows of their `dc_t_tokens` embedding are our `time_table`.

AGSM (Alg. 1, eq. 17) trains two sets, psi+ for matched pairs and psi- for mismatched pairs, and
computes its alignment reward with an EMA copy of each (hat psi+-). `PairTokens` holds the four and
their EMA update. As in the AGSM code (transformer.py: one `soft_tokens` parameter of shape (2, L, m, d),
index 0 = psi+, 1 = psi-, and one `soft_t_tokens` table), psi+ and psi- have their own tokens but share
ONE time table, which both losses train; the EMA copies share theirs likewise. A forward pass can use a
different set per batch row (hooks.py): the sets are addressed by their position in `sets`, which is
why the constants POS, NEG, EMA_POS, EMA_NEG exist.

Files are safetensors with metadata saying how to attach them (family, layers, tokens, width, ...);
`import_softrepa` and `import_agsm` read the authors' released .pth files without running code in them.
"""

import json
import os

import torch
import torch.nn as nn

import files
import hooks
import models
import recipe
from losses import LOSSES

TIME_BINS = 100
POS, NEG, EMA_POS, EMA_NEG = 0, 1, 2, 3  # positions in PairTokens.sets


def time_bin(timesteps):
    """Row of the time table for denoiser timesteps in [0, 1000]: int cast, 1000 -> 999, then // 10."""
    return timesteps.long().clamp(0, 10 * TIME_BINS - 1) // 10


class SoftTokens(nn.Module):
    """m soft tokens of width d for each of L layers, plus an optional table of TIME_BINS time rows."""

    def __init__(self, layers, n_tokens, width, time_table=True, init_std=0.02, init_tokens=None):
        super().__init__()
        # N(0, 0.02) for SD3 / SDXL (SoftREPA Table 5); SD1.5 starts from the unconditional ("")
        # text embedding instead (SoftREPA app. B: random init degraded SD1.5), passed as init_tokens.
        start = torch.randn(layers, n_tokens, width) * init_std
        if init_tokens is not None:
            start = init_tokens.detach().float().reshape(1, n_tokens, width).expand(layers, -1, -1).clone()
        self.tokens = nn.Parameter(start)
        # The time rows start at N(0, 0.02) too, as both authors' codes initialise their nn.Embedding
        # (SoftREPA and AGSM transformer.py); zeros would make every timestep start with the same tokens.
        self.time_table = nn.Parameter(torch.randn(TIME_BINS, layers, width) * init_std) if time_table else None

    @property
    def shape(self):
        return tuple(self.tokens.shape)  # (layers, n_tokens, width)

    @property
    def sets(self):
        return [self]  # what hooks.attach takes: one set (PairTokens has four)

    def trainable(self):
        return list(self.parameters())

    def forward(self, timesteps):
        """(B,) timesteps -> (B, L, m, d) tokens s^(k,t) for every layer k (SoftREPA eq. 12)."""
        tokens = self.tokens.unsqueeze(0).expand(len(timesteps), -1, -1, -1)
        if self.time_table is None:
            # a copy, not the view: under no_grad a view of a Parameter still says requires_grad but has
            # no grad_fn, which trips autograd's module hooks (torch's FlopCounterMode, bench.py)
            return tokens.clone()
        rows = self.time_table[time_bin(timesteps).to(self.tokens.device)]  # (B, L, d)
        return tokens + rows.unsqueeze(2)


class PairTokens(nn.Module):
    """AGSM's dual parameterisation (sec. 3.3, Alg. 1): psi+ and psi-, and their EMA copies. psi+ and
    psi- share one time table (the same Parameter object in both), as in the AGSM code."""

    def __init__(self, layers, n_tokens, width, time_table=True, init_std=0.02, init_tokens=None, ema_init="copy"):
        super().__init__()
        self.pos = SoftTokens(layers, n_tokens, width, time_table, init_std, init_tokens)
        self.neg = SoftTokens(layers, n_tokens, width, False)
        self.ema_pos = SoftTokens(layers, n_tokens, width, time_table, init_std, init_tokens)
        self.ema_neg = SoftTokens(layers, n_tokens, width, False)
        self.neg.time_table, self.ema_neg.time_table = self.pos.time_table, self.ema_pos.time_table  # shared
        with torch.no_grad():
            # psi- is a second N(0, 0.02) draw, as in the AGSM code (torch.randn(2, ...)); with an init from
            # the text embedding (SD1.5) both start from it.
            if init_tokens is not None:
                self.neg.tokens.copy_(self.pos.tokens)
                self.ema_neg.tokens.copy_(self.pos.tokens)
            if ema_init == "copy":  # the EMA copies start equal to the live sets (ours, the shapes world's)
                self.ema_pos.tokens.copy_(self.pos.tokens)
                self.ema_neg.tokens.copy_(self.neg.tokens)
                if time_table:
                    self.ema_pos.time_table.copy_(self.pos.time_table)
            # ema_init "draw": the EMA sets keep their own N(0, 0.02) draws above, as the AGSM code's EMA model
            # is built separately with its own random tokens (sampler.py: a second SD3Transformer2DModel_AGSM),
            # which its 0.9999 decay carries for ~10^4 steps (recipe.py: the default on the real families)
        self.ema_pos.requires_grad_(False)
        self.ema_neg.requires_grad_(False)

    @property
    def sets(self):
        return [self.pos, self.neg, self.ema_pos, self.ema_neg]  # indexed by POS, NEG, EMA_POS, EMA_NEG

    def _unique(self, *sets):
        """The distinct parameters of `sets`, in order (the shared time table once)."""
        return list({id(p): p for s in sets for p in s.parameters()}.values())

    def trainable(self):
        return self._unique(self.pos, self.neg)

    @torch.no_grad()
    def update_ema(self, decay):
        """hat psi <- decay * hat psi + (1 - decay) * psi, each distinct parameter once (AGSM train.py
        update_ema; its decay 0.9999 per step at 100k steps, recipe.py scales it with the run)."""
        for e, p in zip(self._unique(self.ema_pos, self.ema_neg), self._unique(self.pos, self.neg)):
            e.lerp_(p, 1.0 - decay)


def uncond_init(bb, n_tokens):
    """SD1.5's init: the BOS vector of the unconditional ("") text embedding, copied n_tokens times. This
    is what the AGSM code does (encode_prompt([""])[0][0, :1].expand(n, -1)), and the released SoftREPA
    SD1.5 tokens are four identical vectors: the BOS state is the same for every prompt (CLIP is causal),
    so the tokens start as extra copies of a position the UNet already reads."""
    hidden = models.encode_prompts(bb, [""])["encoder_hidden_states"][0]
    return hidden[:1].expand(n_tokens, -1).float().cpu()


def token_movement(tokens, initial):
    """How far tokens moved from `initial` (a state_dict of the same module): the cosine between the
    current and the initial token vectors, averaged over tokens (each MM-DiT block sees its tokens through
    a LayerNorm without affine, so only their direction matters), and the relative L2 change."""
    now = {
        k: v.detach().float().cpu() for k, v in tokens.state_dict().items() if k.endswith("tokens") and "ema" not in k
    }
    if not now:  # LoRA adapters: no token vectors (B starts at 0: no cosine either)
        return float("nan"), float("nan")
    cos, rel = [], []
    for k, v in now.items():
        v0 = initial[k].float().cpu()
        cos.append(torch.nn.functional.cosine_similarity(v.flatten(0, -2), v0.flatten(0, -2), dim=-1).mean())
        rel.append((v - v0).norm() / v0.norm().clamp(min=1e-12))
    return float(torch.stack(cos).mean()), float(torch.stack(rel).mean())


@torch.no_grad()
def movement(bb, tokens, initial_tokens, handle, prompts):
    """How far the tokens have moved (SoftREPA/AGSM do not report this; the std of the tokens cannot show
    it, as each MM-DiT block sees them through a LayerNorm without affine): the cosine of the tokens to
    their initial values, their relative L2 change, and the relative change of the denoiser's output
    that the (psi+) tokens cause, ||f_tokens - f_plain|| / ||f_plain||, on fixed `prompts` at t = 500."""
    cos, change = token_movement(tokens, initial_tokens)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(prompts),) + models.latent_shape(bb), generator=g).to(bb.device, bb.dtype)
    cond = models.encode_prompts(bb, prompts)
    t = torch.full((len(prompts),), 500.0, device=bb.device)
    with handle.rows(torch.full((len(prompts),), -1, dtype=torch.long)):
        plain = models.denoise(bb, x, t, cond).float()
    with handle.rows(None):
        with_tokens = models.denoise(bb, x, t, cond).float()
    return dict(
        token_cos=cos,
        token_change=change,
        output_change=float((with_tokens - plain).norm() / plain.norm().clamp(min=1e-12)),
    )


def make_tokens(bb, loss, seed=0, **settings):
    """The soft tokens for backbone `bb` and `loss`: a SoftTokens for a loss of one set, a PairTokens for a loss
    of two (losses.LOSSES' token_sets: AGSM's psi+ and psi-). `settings` (n_tokens, layers, time_table "on" or
    "off", init, ema_init) are the run's; those not given take the recipe's defaults (recipe.py)."""
    r = recipe.defaults(bb.name, loss, **settings)
    n_tokens, layers, time_table = r["n_tokens"], r["layers"], r["time_table"] == "on"
    torch.manual_seed(seed)
    init_tokens = uncond_init(bb, n_tokens) if r["init"] == "uncond" else None
    width = hooks.token_width(bb.denoiser)
    if LOSSES[loss]["token_sets"] == "pair":
        return PairTokens(layers, n_tokens, width, time_table, 0.02, init_tokens, r["ema_init"])
    return SoftTokens(layers, n_tokens, width, time_table, 0.02, init_tokens)


# -----------------------------------------------------------------------------
# Files. One safetensors file holds one or more named sets ("tokens", or "pos", "neg", "ema_pos",
# "ema_neg") and metadata that says how to attach them. safetensors cannot run code when loaded.


def save(path, tokens, **meta):
    from safetensors.torch import save_file

    named = (
        {"tokens": tokens}
        if isinstance(tokens, SoftTokens)
        else dict(pos=tokens.pos, neg=tokens.neg, ema_pos=tokens.ema_pos, ema_neg=tokens.ema_neg)
    )
    first = next(iter(named.values()))
    layers, n_tokens, width = first.shape
    meta = {
        "layers": layers,
        "n_tokens": n_tokens,
        "width": width,
        "time_bins": TIME_BINS if first.time_table is not None else 0,
        "sets": list(named),
        **meta,
    }
    tensors = {}
    for name, s in named.items():
        tensors[f"{name}.tokens"] = s.tokens.detach().float().cpu().contiguous().clone()
        if s.time_table is not None:  # (psi+ and psi- share theirs: written under both names, as copies)
            tensors[f"{name}.time_table"] = s.time_table.detach().float().cpu().contiguous().clone()
    header = {k: json.dumps(v) for k, v in meta.items()}
    files.write(path, lambda tmp: save_file(tensors, tmp, metadata=header))  # atomic: never half a file


def load(path, which=None):
    """(SoftTokens or PairTokens, metadata) from a file written by `save`. `which` picks one set of a
    pair file ("pos", "ema_pos", ...) and returns it as a SoftTokens."""
    if not os.path.exists(path):
        raise SystemExit(f"no token file at {path}")
    meta, tensors = files.read_safetensors(path, "a soft-token file written by train.py", json_metadata=True)
    if "sets" not in meta:
        raise SystemExit(
            f"{path} is not a soft-token file of this project (no metadata); "
            f"for the released SoftREPA .pth files use softtokens.import_softrepa"
        )

    def build(name):
        s = SoftTokens(meta["layers"], meta["n_tokens"], meta["width"], meta["time_bins"] > 0)
        s.tokens.data.copy_(tensors[f"{name}.tokens"])
        if s.time_table is not None:
            s.time_table.data.copy_(tensors[f"{name}.time_table"])
        return s

    if which is not None or meta["sets"] == ["tokens"]:
        name = which or "tokens"
        if name not in meta["sets"]:
            raise SystemExit(f"{path} has token sets {meta['sets']}, not '{name}'")
        return build(name), meta
    pair = PairTokens(meta["layers"], meta["n_tokens"], meta["width"], meta["time_bins"] > 0)
    for name in meta["sets"]:
        getattr(pair, name).load_state_dict(build(name).state_dict())
    return pair, meta


def import_softrepa(folder):
    """The tokens the SoftREPA authors released, as a SoftTokens. `folder` holds dc_tokens.pth and,
    for SD3 / SD1.5, dc_t_tokens.pth (a pickled nn.Embedding). weights_only=True with nn.Embedding as
    the one allowed class: the pickle can rebuild that module and tensors, and run nothing else."""

    def read(name):
        return _read_released(os.path.join(folder, name))

    tokens = read("dc_tokens.pth")
    if tokens.dim() == 2:  # UNet files: one set (m, d) shared by the chosen blocks
        tokens = tokens.unsqueeze(0)
    layers, n_tokens, width = tokens.shape
    has_time = os.path.exists(os.path.join(folder, "dc_t_tokens.pth"))
    s = SoftTokens(layers, n_tokens, width, time_table=has_time)
    s.tokens.data.copy_(tokens)
    if has_time:
        # (100, L * d): row t holds the L layers' d-wide chunks one after another (chunk k for layer k)
        s.time_table.data.copy_(read("dc_t_tokens.pth").view(TIME_BINS, layers, width))
    return s


def _read_released(path):
    """A released .pth: a tensor or a pickled nn.Embedding, loaded with weights_only=True and nn.Embedding
    as the one allowed class (the pickle can rebuild that module and tensors, and run nothing else)."""
    expected = "the released .pth file as downloaded: a tensor or an nn.Embedding"
    obj = files.read_checkpoint(path, "--tokens", expected, allowed=[torch.nn.Embedding])
    obj = obj.weight if isinstance(obj, nn.Module) else obj
    if not torch.is_tensor(obj):
        raise SystemExit(f"{path} holds a {type(obj).__name__}, not a tensor or an nn.Embedding of tokens")
    return obj.detach().float()


def import_agsm(folder):
    """The tokens the AGSM authors released (checkpoints/{sd3,sd1.5,sdxl}/), as a PairTokens: soft_tokens.pth
    is one tensor (2, L, m, d) -- (2, m, d) for the UNets -- with psi+ at index 0 and psi- at 1, and
    soft_t_tokens.pth, if present, the shared time table, an nn.Embedding(100, L * d). The release holds no
    EMA copies: theirs start equal to the live tokens."""
    tokens = _read_released(os.path.join(folder, "soft_tokens.pth"))
    if tokens.dim() == 3:  # UNet files: (2, m, d), one set per sign shared by the chosen blocks
        tokens = tokens.unsqueeze(1)
    if tokens.dim() != 4 or tokens.shape[0] != 2:
        raise SystemExit(f"{folder}/soft_tokens.pth has shape {tuple(tokens.shape)}, not (2, L, m, d) or (2, m, d)")
    _, layers, n_tokens, width = tokens.shape
    time_path = os.path.join(folder, "soft_t_tokens.pth")
    pair = PairTokens(layers, n_tokens, width, time_table=os.path.exists(time_path))
    with torch.no_grad():
        for s, i in ((pair.pos, 0), (pair.neg, 1), (pair.ema_pos, 0), (pair.ema_neg, 1)):
            s.tokens.copy_(tokens[i])
        if pair.pos.time_table is not None:
            table = _read_released(time_path).view(TIME_BINS, layers, width)
            pair.pos.time_table.copy_(table)
            pair.ema_pos.time_table.copy_(table)
    return pair


# -----------------------------------------------------------------------------
# Attaching a file's tokens for sampling, editing and evaluation


def read_tokens(path, name, ema=False, neg_uncond=False):
    """The token sets to attach from `path`, where they go, and their name for the records.

    path: a file written by softtokens.save (a SoftTokens, or AGSM's PairTokens, of which we sample
    with psi+ -- its EMA copy with ema=True -- and put psi- on the unconditional branch with
    neg_uncond=True), or a folder of the SoftREPA authors' released .pth files. Returns
    (sets, meta, token_set): set 0 is the one for the conditional branch and, for neg_uncond, set 1 is
    psi-; meta is the file's metadata, its "placement" (hooks.py) filled in for files written before
    placements were recorded (their UNet "blocks"; None: the family's default, as the released tokens)."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "dc_tokens.pth")):
            raise SystemExit(
                f"{path} is a folder without dc_tokens.pth: pass a token file written by "
                f"train.py or a folder of the released SoftREPA tokens"
            )
        if ema or neg_uncond:
            raise SystemExit(
                "--ema and --neg-uncond need an AGSM pair-token file (psi+ and psi-); "
                f"{path} holds the released SoftREPA tokens (one set)"
            )
        return [import_softrepa(path)], dict(placement=None), "softrepa"
    if not os.path.exists(path):
        raise SystemExit(f"no token file at {path}")
    from safetensors import SafetensorError

    try:
        tokens, meta = load(path)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:  # not a token file of ours (shapes)
        raise SystemExit(
            f"cannot read {path} as a soft-token file ({type(e).__name__}): pass a file written by softtokens.save"
        ) from None
    if meta.get("model") not in (None, name):
        raise SystemExit(f"{path} holds tokens for {meta['model']}, not {name}: pass --model {meta['model']}")
    bad = [k for k, v in tokens.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(
            f"{path} holds non-finite numbers (NaN or inf) in {', '.join(bad)}: it comes from a diverged "
            f"run; take an earlier checkpoint's tokens or retrain with a lower --lr"
        )
    if "placement" not in meta:  # written before placements were recorded: UNet groups under "blocks"
        meta["placement"] = {"groups": meta["blocks"]} if meta.get("blocks") else None
    if isinstance(tokens, SoftTokens):
        if ema or neg_uncond:
            raise SystemExit(
                f"--ema and --neg-uncond need an AGSM pair-token file (psi+ and psi-); {path} holds one set"
            )
        return [tokens], meta, "tokens"
    if ema:
        return [tokens.ema_pos, tokens.ema_neg], meta, "ema_pos"
    return [tokens.pos, tokens.neg], meta, "pos"


def attach_tokens(bb, sets, placement=None):
    """hooks.attach on the backbone's device at `placement` (None: the family's: the first L blocks of an
    MM-DiT, the family's groups of a UNet); a one-line error for a placement the backbone cannot take."""
    sets = [s.to(bb.device) for s in sets]
    if placement is None and bb.facts["arch"] == "unet":
        placement = {"groups": list(bb.facts["token_blocks"])}
    try:
        return hooks.attach(bb.denoiser, sets, placement)
    except ValueError as e:
        raise SystemExit(f"cannot attach these tokens to {bb.name}: {e}") from None
