"""
prompt.py: vectors at the text encoder's input, in the place of words (textual inversion's place).

Textual inversion (Gal et al. 2022, eq. 2) learns the embedding v* of a new word S*: the prompt's word
embeddings, with v* at S*'s position, go through the frozen text encoder, and the gradient reaches v*
through every layer of it. Unlike the soft tokens (softtokens.py), which are prepended to the denoiser's
text stream after the encoder, such a vector changes the encoder's state of every later word (the encoder
is causal) and its pooled summary.

`at_input` is the one mechanism: a forward hook on the encoder's token-embedding table that puts a vector
in place of each occurrence of a placeholder id, the k-th occurrence in a row taking the k-th vector. The
prompts carry the placeholders as words (placed after <bos>, where textual inversion's S* sits when it
leads the prompt); rows without them (CFG's unconditional "") are left alone.
"""

from contextlib import contextmanager

import torch


def placed(embeddings, ids, vectors, placeholder_id):
    """embeddings (B, L, d) of `ids` (B, L) with the k-th `placeholder_id` of each row replaced by vectors[k]
    ((n, d), shared by the rows) or vectors[b, k] ((B, n, d): one set per row)."""
    mask = ids == placeholder_id
    if not mask.any():
        return embeddings
    rank = (mask.cumsum(dim=1) - 1).clamp(min=0)  # which vector each placeholder takes
    n = vectors.shape[-2]
    if int(mask.sum(dim=1).max()) > n:
        raise ValueError(f"a prompt has {int(mask.sum(dim=1).max())} placeholders for {n} vectors")
    rank = rank.clamp(max=n - 1)
    if vectors.dim() == 2:
        chosen = vectors[rank]  # (B, L, d)
    else:
        chosen = torch.gather(vectors, 1, rank[..., None].expand(-1, -1, vectors.shape[-1]))
    return torch.where(mask[..., None], chosen.to(embeddings.dtype), embeddings)


@contextmanager
def at_input(text_encoder, vectors, placeholder_id):
    """While inside, text_encoder reads `vectors` at its placeholder positions (see `placed`)."""
    table = text_encoder.get_input_embeddings()
    handle = table.register_forward_hook(lambda module, args, out: placed(out, args[0], vectors, placeholder_id))
    try:
        yield
    finally:
        handle.remove()
