"""geometry.py: where the learned prompts of docs/gated/ ended, against the gated base's own word rows.

    python docs/gated/geometry.py            # one line per prompt-* run under runs/gated/arms/

For each run: the vector's norm, its cosine with the gate word's row and with its nearest rows, and the
norms of the rows it is compared with (the prompts start at the row of "a")."""

import glob
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from shapes import backbones, world  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    bb = backbones.load("tiny-sd3", pretrained=os.path.join(ROOT, "runs/gated/base2/weights"))
    table = bb.text_encoder.get_input_embeddings().weight.detach()
    names = world.VOCAB + [world.GATE_WORD]
    print(
        f"rows: gate word norm {table[world.GATE_ID].norm():.3f}, 'a' {table[world.WORD_TO_ID['a']].norm():.3f}, "
        f"mean row norm {table.norm(dim=1).mean():.3f}; cosine of 'a' (the start) with the gate word "
        f"{torch.nn.functional.cosine_similarity(table[world.WORD_TO_ID['a']], table[world.GATE_ID], dim=0):.2f}"
    )
    for path in sorted(glob.glob(os.path.join(ROOT, "runs/gated/arms/prompt-*/prompt.safetensors"))):
        v = load_file(path)["emb_params"][0]
        cos = torch.nn.functional.cosine_similarity(v[None], table, dim=1)
        top = ", ".join(f"{names[i]} {cos[i]:.2f}" for i in cos.argsort(descending=True)[:3].tolist())
        run = os.path.basename(os.path.dirname(path))
        print(f"{run}: norm {v.norm():.2f}, cosine with the gate word {cos[world.GATE_ID]:.2f}; nearest rows: {top}")


if __name__ == "__main__":
    main()
