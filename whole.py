"""
whole.py: the whole denoiser as what trains -- train.py --params all, the positive control beside the soft
tokens (softtokens.py) and LoRA (lora.py). The step (step.py) is the same step; only the trainable numbers
differ: every weight of the denoiser (tiny-sd3: about 2.3M), the text encoders and the VAE still frozen.

The file. A run writes denoiser.safetensors: the denoiser's full state dict, fp32, with the run's recipe in
its header ("params": "all"). sample.py, edit.py and eval.py take it where they take a token or LoRA file
(trained.read sends it here): `attach` loads it into the backbone's denoiser and its handle puts the base
weights back on remove(). A mixed batch (some rows the base, some the trained weights) cannot be one
forward of one set of weights, so the handle refuses it in one line (AGSM's psi+/psi- and CFG's
"--neg-uncond" need that; as on LoRA, AGSM is refused up front).
"""

import json
from contextlib import contextmanager

import torch

import files
import lora


class WholeParams(lora.LoraParams):
    """The denoiser's own weights as the trainable numbers, with the interface train.py uses for soft tokens
    and LoRA (lora.LoraParams': trainable(), parameters(), numel(), state_dict() / load_state_dict()); only
    which parameters differs: all of them."""

    def __init__(self, denoiser):
        denoiser.requires_grad_(True)  # models.load froze it
        self.denoiser, self.config = denoiser, None
        self.named = dict(denoiser.named_parameters())


class WholeHandle:
    """The hooks' interface for whole weights: every row of a forward uses the denoiser as it is (trained or
    loaded); remove() puts back the weights it had before attach (None: nothing to put back, training)."""

    def __init__(self, denoiser, before=None):
        self.denoiser, self.before = denoiser, before

    @contextmanager
    def rows(self, choice):
        if choice is not None and not bool((torch.as_tensor(choice) >= 0).all()):
            raise SystemExit(
                "a whole-denoiser file is one set of weights: rows on the base model (--neg-uncond, AGSM's "
                "psi-) need a token or LoRA file"
            )
        yield self

    def remove(self):
        if self.before is not None:
            self.denoiser.load_state_dict(self.before)


def save(path, params, **meta):
    """denoiser.safetensors: the state dict (fp32) and `meta` (JSON values) with "params": "all"."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().float().cpu().contiguous().clone() for n, p in params.named.items()}
    tensors.update({n: b.detach().float().cpu().contiguous().clone() for n, b in params.denoiser.named_buffers()})
    header = {k: json.dumps(v) for k, v in {"params": "all", **meta}.items()}
    files.write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def is_whole_file(path):
    """A file of `save`: files.describe reads its header ("params": "all")."""
    return files.describe(path)[0] == "whole"


class Weights(dict):
    """A whole-denoiser state dict as trained.read returns it (trained.attach knows it by its class)."""


def read(path, name):
    """(Weights, info) of a whole-denoiser file for family `name`, with one-line errors."""
    header, state = files.read_safetensors(path, "a whole-denoiser file (train.py --params all)")
    model = json.loads(header.get("model", "null"))
    if model not in (None, name):
        raise SystemExit(f"{path} holds a {model} denoiser, not {name}: pass --model {model}")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"{path} holds non-finite numbers in {bad[0]}: it comes from a diverged run")
    return Weights(state), dict(token_set="all", blocks=None, path=path)


def attach(bb, weights):
    """The file's weights into bb's denoiser (a file of another size: one line); the handle restores them."""
    before = {k: v.detach().clone() for k, v in bb.denoiser.state_dict().items()}
    own = bb.denoiser.state_dict()
    wrong = [k for k in own if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape)]
    if wrong or len(weights) != len(own):
        first = wrong[0] if wrong else next(k for k in weights if k not in own)
        raise SystemExit(f"this whole-denoiser file does not fit {bb.name}'s denoiser ({first})")
    bb.denoiser.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    return WholeHandle(bb.denoiser, before)
