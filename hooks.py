"""
hooks.py: attach soft tokens to a stock diffusers denoiser, and take them off again.

Nothing is copied or subclassed: we register PyTorch forward hooks on the model and on some of its
blocks, and `remove()` unregisters them, after which the model computes exactly what it computed
before (same modules, same weights, same code path).

MM-DiT (SD3Transformer2DModel), SoftREPA Algorithm 1. The text stream H_text enters block k after the
frozen `context_embedder`. For the first L blocks k < L (the placement below may name other blocks) the
block's own tokens are prepended,
        hat H_text^(k-1) = [s^(k,t); H_text^(k-1)]          (Alg. 1 line 8)
the block mixes image and text in joint attention, and its text output is cut back to the last n
positions before the next block,
        H_text^(k) = hat H_text^(k)[-n:]                     (Alg. 1 line 13)
so every block sees its own tokens only. The other blocks are untouched. The same path serves SD3.5
(dual attention, QK-norm: the same block interface) and FLUX's FluxTransformer2DModel, whose blocks
also take the text stream separately and return (text, image): there the tokens go into the placed
double-stream blocks, each such block gets the rotary embedding of its own text length (the tokens'
ids are FLUX's text ids, zeros: cos 1, sin 0), and the single-stream blocks see no tokens.

UNet (UNet2DConditionModel, SD1.5 / SDXL). The m tokens are inserted right after the first (BOS)
text token of the sequence that the cross-attention of the chosen blocks ("down", "mid", "up") sees:
        [h_BOS; s^(t); h_1 ... h_{n-1}]
SoftREPA used the down blocks for SD1.5 and down + mid for SDXL; AGSM down + mid for both. With
L = 1 token layer the chosen blocks share one set (as the released tokens); with L > 1, block j of
the chosen ones uses layer j.

Per-row token sets. `attach` takes one SoftTokens or a list of sets (e.g. PairTokens.sets =
[psi+, psi-, EMA psi+, EMA psi-]). A forward inside `with handle.rows(choice):` reads a LongTensor
`choice` with one entry per batch row: the set that row uses, or -1 for no tokens (None: every row
uses set 0). AGSM's step runs all B x B pairs, psi+ on the diagonal and psi- elsewhere, in one batched
forward this way. Rows without tokens are kept out of the soft tokens' reach: in a UNet the attention
mask hides the token positions; in the MM-DiT's joint attention (where diffusers' processor takes no
mask) the hooked blocks' attention runs those rows on the text without the token positions.
"""

import inspect
from contextlib import contextmanager

import torch

_STATE = "_soft_token_state"  # key under which the MM-DiT's per-call token state travels


def is_mmdit(model):
    return hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder")


def token_width(model):
    """Width d of a soft token: the text stream after `context_embedder` (MM-DiT), or the
    cross-attention's key/value input (UNet)."""
    if is_mmdit(model):
        return model.context_embedder.out_features
    width = model.config.cross_attention_dim
    return width if isinstance(width, int) else width[0]


def unet_blocks(model, where):
    """The UNet blocks with cross-attention in the parts named by `where` ("down", "mid", "up")."""
    parts = {"down": list(model.down_blocks), "mid": [model.mid_block], "up": list(model.up_blocks)}
    unknown = set(where) - set(parts)
    if unknown:
        raise ValueError(f"unknown UNet block group(s) {sorted(unknown)}: use down, mid, up")
    return [
        b
        for part in ("down", "mid", "up")
        if part in where
        for b in parts[part]
        if b is not None and getattr(b, "has_cross_attention", False)
    ]


_SIGNATURES = {}  # forward signature per module class: inspect.signature costs ~20 us, hooks run per block


def _bind(module, args, kwargs):
    """All arguments of a call as keywords (a hook then reads and replaces them by name)."""
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    arguments = dict(_SIGNATURES[cls].bind(module, *args, **kwargs).arguments)
    del arguments[next(iter(arguments))]  # self
    return arguments


def tokens_for_rows(sets, timesteps, choice=None):
    """Per-row tokens for one batched forward in which row b uses set `choice[b]`, -1 meaning none.

    Returns (tokens (B, L, m, d), used (B,) bool or None when every row has tokens). The rows without
    tokens get zeros here; the hooks below hide them from attention with a mask, so those rows compute what
    the model computes without tokens."""
    if choice is None:
        return sets[0](timesteps), None
    choice = choice.to(timesteps.device)
    per_set = torch.stack([s(timesteps) for s in sets])  # (S, B, L, m, d)
    rows = torch.arange(len(timesteps), device=timesteps.device)
    tokens = per_set[choice.clamp(min=0), rows]  # (B, L, m, d)
    used = choice >= 0
    return tokens * used.view(-1, 1, 1, 1).to(tokens.dtype), used


class NoTokenRowsAttention:
    """Wraps a block's joint-attention processor. Without a `soft_rows` argument it *is* the stock
    processor. With soft_rows = (used, m) it runs the rows that have tokens as usual and the rows
    without on the text stream minus its first m (token) positions, giving those rows exactly the
    no-token result; their token positions get zeros, which the cut after the block drops."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        soft_rows=None,
        **kwargs,
    ):
        if image_rotary_emb is not None:  # FLUX: FluxAttention passes its rotary embedding 5th, positionally
            kwargs["image_rotary_emb"] = image_rotary_emb
        if soft_rows is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        used, m = soft_rows
        image_out = torch.empty_like(hidden_states)
        text_out = torch.zeros_like(encoder_hidden_states)
        cut = dict(kwargs)
        if image_rotary_emb is not None:  # rows without tokens: without the tokens' m rotary positions too
            cut["image_rotary_emb"] = tuple(f[m:] for f in image_rotary_emb)
        for rows, text, kw in ((used, encoder_hidden_states, kwargs), (~used, encoder_hidden_states[:, m:], cut)):
            if rows.any():
                image_rows, text_rows = self.inner(attn, hidden_states[rows], text[rows], attention_mask, **kw)
                image_out[rows] = image_rows
                text_out[rows, text_out.shape[1] - text_rows.shape[1] :] = text_rows
        return image_out, text_out


class SoftTokenHooks:
    """What `attach` returns: the attached sets, the per-row `choice`, and `remove()`."""

    def __init__(self, model, sets):
        self.model, self.sets = model, sets
        self.choice = None  # None: every row uses sets[0]; else (B,) long, -1 = no tokens
        self.state = None  # (tokens (B, L, m, d), used (B,) or None) of the forward in progress
        self._handles, self._processors = [], []

    @contextmanager
    def rows(self, choice):
        """with handle.rows(choice): model(...)  -- a per-row token choice for the calls inside."""
        previous, self.choice = self.choice, choice
        try:
            yield self
        finally:
            self.choice = previous

    def remove(self):
        for h in self._handles:
            h.remove()
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._handles, self._processors, self.state = [], [], None

    # -- the model-level pre-hook: timesteps -> this call's tokens -------------------------------
    def _tokens_for_call(self, batch, timestep, device):
        timestep = torch.as_tensor(timestep, device=device).float().reshape(-1)
        timestep = timestep.expand(batch) if timestep.numel() == 1 else timestep
        choice = self.choice
        if choice is not None and len(choice) != batch:
            raise ValueError(f"token choice has {len(choice)} rows but the batch has {batch}")
        tokens, used = tokens_for_rows(self.sets, timestep, choice)
        if used is not None and bool(used.all()):
            used = None  # no row without tokens: the plain path
        return tokens, used


# Where the tokens go: the placement, carried by every token file (softtokens.save) so that a file attaches as
# it was trained. One dict, its keys by architecture:
#   MM-DiT  {"blocks": [k_0, k_1, ...]}  the transformer blocks with tokens, layer l of the tokens in block k_l
#           (default: the first L blocks, SoftREPA Alg. 1)
#   UNet    {"groups": ["down", "mid"]}  the cross-attention blocks of these groups; with L = 1 layer they share
#           it, with L > 1 the j-th chosen block takes layer j (default: ("down",))
# A key this code does not know is refused, never ignored: a file placed some other way must not be attached
# silently to the default blocks.
PLACEMENT_KEYS = {"mmdit": {"blocks"}, "unet": {"groups"}}


def placement_of(model, layers, placement=None):
    """The full placement of `layers` token layers in `model`: `placement`'s keys checked, the rest defaulted.
    ValueError (one line) for a placement the model cannot take."""
    arch = "mmdit" if is_mmdit(model) else "unet"
    placement = dict(placement or {})
    unknown = set(placement) - PLACEMENT_KEYS[arch]
    if unknown:
        raise ValueError(
            f"placement {sorted(unknown)} is not one this code can honour on a {type(model).__name__} (it places "
            f"tokens by {sorted(PLACEMENT_KEYS[arch])})"
        )
    if arch == "unet":
        return {"groups": list(placement.get("groups") or ("down",))}
    blocks = [int(k) for k in placement.get("blocks", range(layers))]
    n_blocks = len(model.transformer_blocks)
    if len(blocks) != layers or len(set(blocks)) != layers or not all(0 <= k < n_blocks for k in blocks):
        raise ValueError(
            f"{layers} token layers cannot go into blocks {blocks} of a model with {n_blocks} blocks (one distinct "
            f"block per layer)"
        )
    return {"blocks": blocks}


def attach(model, tokens, placement=None):
    """Attach soft tokens to a stock diffusers denoiser; returns a SoftTokenHooks with `.remove()`.

    tokens: a SoftTokens, or a list of them (the sets a row can choose from; same shapes).
    placement: where they go (the dict above; None or missing keys: the default).
    """
    sets = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    shape = sets[0].shape
    if any(s.shape != shape for s in sets):
        raise ValueError(f"token sets differ in shape: {[s.shape for s in sets]}")
    layers, m, width = shape
    if width != token_width(model):
        raise ValueError(
            f"soft tokens of shape {shape} (layers, tokens, width) do not fit this "
            f"{type(model).__name__}: its token width is {token_width(model)}"
        )
    if is_mmdit(model) and layers > len(model.transformer_blocks):
        raise ValueError(
            f"soft tokens of shape {shape} need {layers} blocks; this model has {len(model.transformer_blocks)}"
        )
    where = placement_of(model, layers, placement)
    handle = SoftTokenHooks(model, sets)
    handle.placement = where
    if is_mmdit(model):
        _attach_mmdit(model, handle, where["blocks"], m)
    else:
        _attach_unet(model, handle, layers, m, shape, where["groups"])
    return handle


def _attach_mmdit(model, handle, blocks, m):
    layer_of = {k: layer for layer, k in enumerate(blocks)}  # block index -> the token layer it takes

    def model_pre_hook(module, args, kwargs):
        call = _bind(module, args, kwargs)
        x = call["hidden_states"]
        timestep = call["timestep"]
        if "img_ids" in call:  # FLUX is called with sigma in [0, 1] and scales it by 1000 itself
            timestep = torch.as_tensor(timestep) * 1000
        state = handle._tokens_for_call(x.shape[0], timestep, x.device)
        # The state rides in joint_attention_kwargs, a fresh dict per call that the model hands to every
        # block: a block recomputed under gradient checkpointing (in backward, after later forwards)
        # receives the same dict and so the same tokens.
        call["joint_attention_kwargs"] = {**(call.get("joint_attention_kwargs") or {}), _STATE: state}
        return (), call

    def block_pre_hook(k):
        def hook(block, args, kwargs):
            call = _bind(block, args, kwargs)
            extra = dict(call.get("joint_attention_kwargs") or {})
            tokens, used = extra.pop(_STATE)
            if k in layer_of:
                text = call["encoder_hidden_states"]
                call["encoder_hidden_states"] = torch.cat([tokens[:, layer_of[k]].to(text), text], dim=1)  # Alg.1 l.8
                rope = call.get("image_rotary_emb")
                if rope is not None:  # FLUX: rotary positions for the m more text positions, whose ids are
                    cos, sin = rope  # (0, 0, 0) like every FLUX text id: cos 1, sin 0
                    call["image_rotary_emb"] = (
                        torch.cat([cos.new_ones(m, cos.shape[-1]), cos]),
                        torch.cat([sin.new_zeros(m, sin.shape[-1]), sin]),
                    )
                if used is not None:
                    extra["soft_rows"] = (used, m)
            call["joint_attention_kwargs"] = extra or None  # the block's attention sees no state
            return (), call

        return hook

    def block_post_hook(block, args, kwargs, output):
        text, image = output
        return (None if text is None else text[:, m:]), image  # Alg. 1 l. 13: keep the last n

    def single_block_pre_hook(block, args, kwargs):  # FLUX's single-stream blocks: no tokens, no state
        call = _bind(block, args, kwargs)
        extra = dict(call.get("joint_attention_kwargs") or {})
        extra.pop(_STATE, None)
        call["joint_attention_kwargs"] = extra or None
        return (), call

    handle._handles.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    for block in getattr(model, "single_transformer_blocks", []):
        handle._handles.append(block.register_forward_pre_hook(single_block_pre_hook, with_kwargs=True))
    for k, block in enumerate(model.transformer_blocks):
        handle._handles.append(block.register_forward_pre_hook(block_pre_hook(k), with_kwargs=True))
        if k in layer_of:
            handle._handles.append(block.register_forward_hook(block_post_hook, with_kwargs=True))
            handle._processors.append((block.attn, block.attn.processor))
            block.attn.set_processor(NoTokenRowsAttention(block.attn.processor))


def _attach_unet(model, handle, layers, m, shape, where):
    chosen = unet_blocks(model, where)
    if layers not in (1, len(chosen)):
        raise ValueError(
            f"soft tokens of shape {shape} have {layers} layers; the UNet's chosen blocks "
            f"{tuple(where)} are {len(chosen)}: use 1 (shared) or {len(chosen)} layers"
        )

    def model_pre_hook(module, args, kwargs):
        call = _bind(module, args, kwargs)
        x = call["sample"]
        handle.state = handle._tokens_for_call(x.shape[0], call["timestep"], x.device)

    def block_pre_hook(j):
        def hook(block, args, kwargs):
            tokens, used = handle.state
            text = kwargs["encoder_hidden_states"]
            soft = tokens[:, j if layers > 1 else 0].to(text)
            kwargs["encoder_hidden_states"] = torch.cat([text[:, :1], soft, text[:, 1:]], dim=1)
            bias = kwargs.get("encoder_attention_mask")  # at block level: additive (B, 1, n) or None
            if used is not None or bias is not None:
                # Token positions: 0 (visible) for rows with tokens, -10000 (diffusers' "masked") for
                # rows without, so those rows' cross-attention weights on them are exactly zero.
                token_bias = torch.where(used, 0.0, -10000.0) if used is not None else torch.zeros(len(text))
                token_bias = token_bias.to(text).view(-1, 1, 1).expand(-1, 1, m)
                if bias is None:
                    bias = torch.zeros(text.shape[0], 1, text.shape[1], dtype=text.dtype, device=text.device)
                kwargs["encoder_attention_mask"] = torch.cat([bias[..., :1], token_bias, bias[..., 1:]], dim=-1)
            return args, kwargs

        return hook

    handle._handles.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    for j, block in enumerate(chosen):
        handle._handles.append(block.register_forward_pre_hook(block_pre_hook(j), with_kwargs=True))
