"""
shapes/backbones.py: the shapes world's tiny backbones, built and loaded.

The tiny-* families of families.py are the real families' classes at tiny sizes (SD3Transformer2DModel,
UNet2DConditionModel, AutoencoderKL, CLIPTextModel), trained from scratch by shapes/pretrain.py on the
world's renders and shipped in shapes/weights/. They differ from a hub checkpoint in two ways only: the
text encoder reads the world's word-level vocabulary (shapes/world.py: VOCAB, tokenize), and the weights
are plain safetensors files, one per part. So this file builds the stock classes from the configs
below, loads those files, and hands models.Backbone the world's `tokenize`; everything after that
(encoding, noising, denoising, the tokens' hooks) is the one code path of every family.

The scripts choose the world: `models.from_flags(args, shapes_world=backbones.load)`.
"""

import functools
import os

import torch

import files
import models
from shapes import world

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


# The shapes world's text encoder and autoencoder (its denoisers: FAMILIES' tiny-*); pretrain.py trains them.
TINY_TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=128,
)
# The shapes world's autoencoder: the real families' AutoencoderKL at 0.23M parameters, 32x32x3 -> 8x8x4
# (vae_factor 4): 64 latent positions, and the decoder draws the crisp edges (a pixel-space denoiser of the
# same cost drew blocky fragments). No attention in its middle block: flat colours need none. scaling_factor
# and shift_factor are measured on renders after training (pretrain.py), saved with the weights.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
    mid_block_add_attention=False,
)


def tiny_text_encoder(seed=0, vocab_size=len(world.VOCAB)):
    """vocab_size: the world's words, or one more row for the gated base's word (world.GATE_WORD)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    # CLIP pools the hidden state at the EOS token (the summary of the prompt); shapes/world.py explains ids
    ids = world.WORD_TO_ID
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        **TINY_TEXT_CONFIG,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_vae(seed=0, scaling_factor=1.0, shift_factor=0.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG, scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def build_tiny(name, seed=0, vae=None, vocab_size=len(world.VOCAB)):
    """A random-weight shapes-world backbone (what pretrain.py starts from); `vae` defaults to a random one.
    vocab_size: the text encoder's table (one more row than the world's words: the gated base)."""
    facts = models.check_name(name)
    bb = models.Backbone(
        name,
        facts,
        models.random_denoiser(name, seed=seed),
        text_encoder=tiny_text_encoder(seed + 1, vocab_size),
        vae=vae if vae is not None else tiny_vae(seed + 2),
        tokenize=functools.partial(world.tokenize, vocab_size=vocab_size),
    )
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = models.ddpm_alphas_cumprod()
    return bb


TINY_VAE_DIR = os.path.join(WEIGHTS_DIR, "tiny-vae")
TOKEN_TABLE = "embeddings.token_embedding.weight"  # its key in a tiny CLIPTextModel's state dict


def vocab_size(text_encoder_file):
    """The rows of a saved tiny text encoder's token table: the world's words, or one more (the gated base)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(text_encoder_file, "pt") as f:
            return f.get_slice(TOKEN_TABLE).get_shape()[0]
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError):
        return len(world.VOCAB)  # not such a file: files.load_weights says so in one line


def grow_vocab(state, rows):
    """A text encoder's state dict with its token table grown to `rows`, each new row a copy of <unk>'s:
    a new word starts as the encoder reads any unseen word, and training gives it its own meaning."""
    table = state[TOKEN_TABLE]
    extra = table[world.UNK_ID].expand(rows - len(table), -1)
    return {**state, TOKEN_TABLE: torch.cat([table, extra])}


def load_tiny_vae(folder=TINY_VAE_DIR):
    """The trained shapes-world autoencoder, with the latent normalisation stored beside its weights."""
    path = os.path.join(folder, "vae.safetensors")
    if not os.path.exists(path):
        raise SystemExit(
            f"no autoencoder weights at {path}; rebuild them with `python -m shapes.pretrain --model tiny-vae`"
        )
    meta, _ = files.read_safetensors(path, "the shapes world's autoencoder (shapes.pretrain --model tiny-vae)", False)
    try:
        vae = tiny_vae(scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]))
    except (KeyError, ValueError):
        raise SystemExit(f"{path}: no scaling_factor / shift_factor in its metadata; expected tiny-vae's") from None
    files.load_weights(vae, path, "the shapes world's autoencoder")
    return vae


def load_tiny(name, folder):
    """shapes/weights/<name>/{denoiser,text_encoder}.safetensors, and the shared autoencoder beside them."""
    parts = {part: os.path.join(folder, f"{part}.safetensors") for part in ("denoiser", "text_encoder")}
    missing = [f for f in parts.values() if not os.path.exists(f)]
    if missing:
        raise SystemExit(
            f"{name}: no weights at {missing[0]}; rebuild them with `python -m shapes.pretrain --model {name}`"
        )
    vae_folder = os.path.join(os.path.dirname(os.path.abspath(folder)), "tiny-vae")
    bb = build_tiny(
        name,
        vae=load_tiny_vae(vae_folder if os.path.isdir(vae_folder) else TINY_VAE_DIR),
        vocab_size=vocab_size(parts["text_encoder"]),
    )
    files.load_weights(bb.denoiser, parts["denoiser"], f"{name}'s denoiser")  # another model's: one line
    files.load_weights(bb.text_encoder, parts["text_encoder"], f"{name}'s text encoder")
    return bb


def load(name, pretrained=None, random_init=False, seed=0):
    """The tiny backbone `name` as a script's flags ask for it: the shipped weights (shapes/weights/<name>/),
    another weights folder (`pretrained`, e.g. a pretrain.py snapshot), or random weights (`random_init`:
    tests). Frozen and in eval mode, as models.load leaves a hub backbone."""
    if random_init:
        return build_tiny(name, seed)
    if pretrained is not None and not os.path.exists(os.path.join(pretrained, "denoiser.safetensors")):
        raise files.refuse(
            "--pretrained",
            pretrained,
            f"{name}'s weights (denoiser.safetensors, text_encoder.safetensors), a folder written by "
            f"`python -m shapes.pretrain --model {name}` (its --out, or a snapshot)",
        )
    bb = load_tiny(name, pretrained or os.path.join(WEIGHTS_DIR, name))
    for module in (bb.denoiser, bb.text_encoder, bb.vae):
        module.requires_grad_(False).eval()
    return bb


def random_backbone(name, size="real", seed=0):
    """Any family's backbone with random weights: a tiny one whole, a real family's denoiser alone."""
    return build_tiny(name, seed) if models.is_shapes_world(name) else models.random_backbone(name, size, seed)


def check_prompts(name, prompts):
    """The tiny models read only the shapes world's words (world.VOCAB), at most world.MAX_LEN tokens: a
    prompt outside that is refused in one line before anything loads. Other families read any text."""
    if not models.is_shapes_world(name):
        return
    for prompt in prompts:
        problem = world.language_problem(prompt)
        if problem:
            raise SystemExit(f"prompt {prompt!r} is not in the shapes world's language ({problem})")
