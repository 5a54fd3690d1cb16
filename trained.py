"""
trained.py: a trained file -- soft tokens, LoRA adapters, a learned prompt at the text encoder's input
(prompt.py) or the whole denoiser (whole.py) -- read and put on a backbone as it was trained.

What train.py writes is one of two things (SoftREPA Table 3 compares them): a token file
(softtokens.save; or a folder of the SoftREPA authors' released tokens), whose sets the hooks put into
the text stream, or a LoRA file in diffusers' format (lora.save; or any diffusers LoRA), whose adapters
go onto the denoiser's attention weights. A file carries how it attaches: its family, what it holds, and
where it goes (a token file's placement: hooks.py; a LoRA file's keys name their layers). sample.py,
edit.py, eval.py, the lab's tools and the analyses under docs/ all take a file through `read`, then
`attached` (or `attach`), and get back the same kind of handle (`handle.rows(...)` picks per row what
each image gets), so nothing downstream asks which one it is or where it goes.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import files
import lora
import models
import prompt
import softtokens
import whole


@dataclass
class Trained:
    """A trained file as read: what it holds and how it attaches."""

    path: str
    kind: str  # "tokens", "lora", "prompt" or "all"
    sets: object  # the token sets (psi+ first; psi- second for --neg-uncond), the LoRA state dict, the learned
    # prompt (prompt.Prompt) or the whole denoiser's weights (whole.Weights)
    placement: dict | None  # tokens: where the hooks put them (hooks.py; None: the family's); LoRA: None
    token_set: str  # for the records: "tokens", "pos", "ema_pos", "softrepa" (released), "lora", "prompt", "all"
    max_sequence_length: int | None = None  # the text stream it was trained on (T5 families; None: not recorded)


# The trained files that hold one set of numbers: none has the EMA copy or the psi- set AGSM's options read.
ONE_SET = {"whole": "a whole denoiser", "prompt": "a learned prompt", "lora": "LoRA adapters (one set)"}


def read(path, name, ema=False, neg_uncond=False):
    """The trained file at `path` for family `name` (None: no file, None back), checked before any model
    loads: its kind (a checkpoint, a run folder or a counter given as --tokens is one line), its family, its
    numbers, and the AGSM-only options (ema: psi+'s EMA copy; neg_uncond: psi- on the unconditional branch)."""
    if path is None:
        return None
    kind = files.check_trained(path)  # what the file says it is (files.describe: its header, no code run)
    if (ema or neg_uncond) and kind in ONE_SET:  # psi+'s EMA copy and psi- exist in AGSM's token files alone
        raise SystemExit(
            f"--ema and --neg-uncond need an AGSM pair-token file (psi+ and psi-); {path} holds {ONE_SET[kind]}"
        )
    if kind == "whole":  # the whole denoiser (train.py --params all)
        weights, _ = whole.read(path, name)
        return Trained(path, "all", weights, None, "all")
    if kind == "prompt":  # a learned prompt at the text encoder's input (train.py --params prompt)
        learned, _ = prompt.read(path, name)
        return Trained(path, "prompt", learned, None, "prompt")
    if kind == "lora":  # LoRA adapters (train.py --params lora, or any diffusers LoRA)
        state, _ = lora.read(path, name, lora.prefix(models.check_name(name)))
        return Trained(path, "lora", state, None, "lora")
    sets, meta, token_set = softtokens.read_tokens(path, name, ema, neg_uncond)
    return Trained(path, "tokens", sets, meta["placement"], token_set, meta.get("max_sequence_length"))


def of_tokens(sets, placement=None):
    """Token sets in memory (a run's, a test's), as a Trained that attach takes: at `placement` (hooks.py;
    None: the family's)."""
    return Trained("(in memory)", "tokens", list(sets), placement, "tokens")


def attach(bb, trained):
    """The file's sets on the backbone as they were trained: adapters onto the denoiser's weights
    (lora.attach), tokens into its text stream at the file's placement (softtokens.attach_tokens). A file
    the backbone cannot take as it was trained is a one-line error. Returns the handle; handle.remove()
    takes them off."""
    trained_on, here = trained.max_sequence_length, bb.facts.get("max_sequence_length")
    if trained_on is not None and here is not None and trained_on != here:
        raise SystemExit(
            f"{trained.path} was trained on a text stream of {trained_on} T5 positions, and this {bb.name} reads "
            f"{here}: pass --max-sequence-length {trained_on}"
        )
    if trained.kind == "lora":
        return lora.attach(bb, trained.sets)
    if trained.kind == "all":
        return whole.attach(bb, trained.sets)
    if trained.kind == "prompt":
        return prompt.attach(bb, trained.sets)
    return softtokens.attach_tokens(bb, trained.sets, trained.placement)


@contextmanager
def attached(bb, trained):
    """with attached(bb, trained) as handle: ...  -- the trained sets on the backbone inside the block
    and off again after it, whatever happens; trained=None: nothing attached (handle None)."""
    handle = attach(bb, trained) if trained is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
