"""shapes/backbones.py: the shapes world's backbones, built and loaded for the scripts to hand to the core."""

import argparse

import pytest
import torch

import models
from shapes import backbones, world


def test_the_shipped_backbone_loads_frozen_and_reads_the_worlds_words():
    bb = backbones.load("tiny-sd3")
    assert all(not p.requires_grad for m in (bb.denoiser, bb.text_encoder, bb.vae) for p in m.parameters())
    assert torch.equal(bb.tokenize(["a red circle"]), world.tokenize(["a red circle"]))
    cond = models.encode_prompts(bb, ["a red circle", ""])
    assert cond["encoder_hidden_states"].shape == (2, world.MAX_LEN, 128)


def test_the_core_takes_the_world_only_from_a_script():
    args = argparse.Namespace(model="tiny-sd3", pretrained=None, random_init=True, device="cpu", precision=None)
    with pytest.raises(SystemExit, match="shapes-world backbone, and this command takes the real families only"):
        models.from_flags(args)
    with pytest.raises(SystemExit, match="load it with shapes.backbones.load"):
        models.load("tiny-sd3")
    bb = models.from_flags(args, shapes_world=backbones.load)
    assert bb.name == "tiny-sd3" and bb.tokenize.func is world.tokenize  # its table's size bound (the gate word)
    assert bb.tokenize.keywords == {"vocab_size": len(world.VOCAB)}


def test_a_pretrained_folder_without_tiny_weights_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--pretrained .*; expected tiny-sd3.s weights"):
        backbones.load("tiny-sd3", str(tmp_path))


def test_prompts_outside_the_worlds_language_are_refused_before_loading():
    with pytest.raises(SystemExit, match="not in the shapes world's language"):
        backbones.check_prompts("tiny-sd1.5", ["a purple elephant"])
    backbones.check_prompts("sd3", ["a purple elephant"])  # real families read any text
