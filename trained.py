"""
trained.py: a trained file, soft tokens or LoRA adapters (or the whole denoiser, whole.py, or a prompt at
the text encoder's input, prompt.py), read and put on a backbone for sampling.

What train.py writes is one of two things (SoftREPA Table 3 compares them): a token file
(softtokens.save; or a folder of the SoftREPA authors' released tokens), whose sets the hooks put into
the text stream, or a LoRA file in diffusers' format (lora.save; or any diffusers LoRA), whose adapters
go onto the denoiser's attention weights. sample.py, edit.py and eval.py take either through the two
functions below, and get back the same kind of handle (`handle.rows(...)` picks per row what each image
gets), so nothing downstream asks which one it is.
"""

from contextlib import contextmanager

import lora
import models
import prompt
import softtokens
import whole


def read(path, name, ema=False, neg_uncond=False):
    """(sets, info) of the trained file at `path` for family `name`: LoRA adapters' state dict, or the
    token sets (softtokens.read_tokens: psi+ first; its EMA copy with ema=True; psi- second, for the
    unconditional branch with neg_uncond=True). info: the token_set name for the records and the blocks."""
    if whole.is_whole_file(path):  # the whole denoiser (train.py --params all)
        return whole.read(path, name, ema, neg_uncond)
    if prompt.is_prompt_file(path):  # a learned prompt at the text encoder's input (train.py --params prompt)
        return prompt.read(path, name, ema, neg_uncond)
    if lora.is_lora_file(path):  # LoRA adapters (train.py --params lora, or any diffusers LoRA)
        return lora.read(path, name, lora.prefix(models.check_name(name)), ema, neg_uncond)
    return softtokens.read_tokens(path, name, ema, neg_uncond)


def attach(bb, sets, blocks=None):
    """The sets of read() on the backbone: adapters onto the denoiser's weights (lora.attach), tokens into
    its text stream (softtokens.attach_tokens). Returns the handle; handle.remove() takes them off."""
    if isinstance(sets, whole.Weights):
        return whole.attach(bb, sets)
    if isinstance(sets, prompt.Prompt):
        return prompt.attach(bb, sets)
    if isinstance(sets, dict):
        return lora.attach(bb, sets)
    return softtokens.attach_tokens(bb, sets, blocks)


@contextmanager
def attached(bb, sets, blocks=None):
    """with attached(bb, sets, blocks) as handle: ...  -- the trained sets on the backbone inside the block
    and off again after it, whatever happens; sets=None: nothing attached (handle None)."""
    handle = attach(bb, sets, blocks) if sets is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
