"""Stock diffusers pipelines built offline from random tiny components (no hub): a character-level
CLIP tokenizer written to a folder, tiny CLIP text encoders, a one-level VAE and tiny denoisers.

`save_stock(family, folder)` writes the family's pipeline to disk in the hub's layout (model_index.json
and one subfolder per component), as a user's `--pretrained /local/copy` holds it: SD3 with all three
text encoders (two CLIPs and a T5 whose tokenizer is built here, offline), FLUX.1 with its CLIP and T5,
and an AutoencoderKL with the real models' 8x downsampling (four levels), so that a family's image sizes
mean what they mean on the hub models."""

import json

import torch

import families
import models


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), len(vocab)


def clip(vocab_size, seed, projection=True, hidden=16):
    """eos_token_id=2: CLIP pools at the argmax id, the last of this vocabulary (EOS)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=2,
            pad_token_id=vocab_size - 1,
        )
    ).eval()


def vae(**extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=16,
        **extra,
    ).eval()


def sd3_pipeline(folder, family="sd3"):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, n = clip_tokenizer(folder)
    # the test-size MM-DiT reads 16 + 16 wide text (the two CLIPs' hidden states) and pooled features
    transformer = models.random_denoiser(family, "test")  # sd3, or sd3.5-*: the same pipeline
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip(n, 1),
        tokenizer=tokenizer,
        text_encoder_2=clip(n, 2),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer, n = clip_tokenizer(folder)
    unet = models.random_denoiser("sd1.5", "test")  # cross-attention 32: one 32-wide CLIP
    pipe = StableDiffusionPipeline(
        vae=vae(scaling_factor=0.18215),
        text_encoder=clip(n, 1, projection=False, hidden=32),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, n = clip_tokenizer(folder)
    unet = models.random_denoiser("sdxl", "test")  # cross-attention 16 + 16, pooled 16
    pipe = StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025),
        text_encoder=clip(n, 1, projection=False),
        text_encoder_2=clip(n, 2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer():
    """A T5 tokenizer built offline: a unigram model over single letters with sentencepiece's word
    marker, EOS appended, padded with <pad> -- what SD3's tokenizer_3 does with its 32k pieces."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as pieces
    from transformers import T5TokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    tok = Tokenizer(pieces.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=512
    ), len(vocab)


def t5(vocab_size, width):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()


def vae8(latent_channels=4, **extra):
    """AutoencoderKL with the hub models' 8x downsampling (four levels, 8 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        **extra,
    ).eval()


def flux_pipeline(folder, family):
    """FLUX.1 at test size: CLIP-L's place (its pooled output, 32 wide) and T5's (the 32-wide text stream),
    a 16-channel 8x VAE with FLUX's latent normalisation and no quant convs, and the hub's scheduler configs
    written out: dev shifts by the image's size (use_dynamic_shifting), schnell not at all."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer, n = clip_tokenizer(folder)
    tokenizer_2, n_2 = t5_tokenizer()
    config, dev = models.denoiser_config(family, "test"), family == "flux-dev"
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        transformer=models.random_denoiser(family, "test"),
        vae=vae8(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip(n, 1, projection=False, hidden=config["pooled_projection_dim"]),
        tokenizer=tokenizer,
        text_encoder_2=t5(n_2, config["joint_attention_dim"]),
        tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_pipeline(family, folder):
    """The family's stock pipeline at test size, every text encoder included, 8x VAE."""
    import os

    os.makedirs(folder, exist_ok=True)
    if families.FAMILIES[family]["pipeline"] == "FluxPipeline":
        return flux_pipeline(folder, family)
    mmdit = families.FAMILIES[family]["arch"] == "mmdit"
    pipe = sd3_pipeline(folder, family) if mmdit else {"sdxl": sdxl_pipeline, "sd1.5": sd15_pipeline}[family](folder)
    scaling = (
        dict(shift_factor=0.0609, scaling_factor=1.5305)
        if mmdit
        else {"sdxl": dict(scaling_factor=0.13025), "sd1.5": dict(scaling_factor=0.18215)}[family]
    )
    pipe.register_modules(vae=vae8(**scaling))
    pipe.vae_scale_factor = 8
    if mmdit:
        tokenizer_3, n = t5_tokenizer()
        pipe.register_modules(
            text_encoder_3=t5(n, models.denoiser_config(family, "test")["joint_attention_dim"]),
            tokenizer_3=tokenizer_3,
        )
    return pipe


def save_stock(family, folder):
    """Write the family's test-size stock pipeline to `folder` in the hub's layout; returns the folder."""
    stock_pipeline(family, folder).save_pretrained(str(folder))
    return str(folder)
