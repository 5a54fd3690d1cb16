"""Stock diffusers pipelines built offline from random tiny components (no hub): a character-level
CLIP tokenizer written to a folder, tiny CLIP text encoders, a one-level VAE and tiny denoisers."""
import json

import torch

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
    return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                              bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1)).eval()


def vae(**extra):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), sample_size=16, **extra).eval()


def sd3_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    tokenizer, n = clip_tokenizer(folder)
    # the test-size MM-DiT reads 16 + 16 wide text (the two CLIPs' hidden states) and pooled features
    transformer = models.random_denoiser("sd3", "test")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=clip(n, 1), tokenizer=tokenizer,
        text_encoder_2=clip(n, 2), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    tokenizer, n = clip_tokenizer(folder)
    unet = models.random_denoiser("sd1.5", "test")            # cross-attention 32: one 32-wide CLIP
    pipe = StableDiffusionPipeline(vae=vae(scaling_factor=0.18215), text_encoder=clip(n, 1, projection=False, hidden=32),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tokenizer, n = clip_tokenizer(folder)
    unet = models.random_denoiser("sdxl", "test")              # cross-attention 16 + 16, pooled 16
    pipe = StableDiffusionXLPipeline(vae=vae(scaling_factor=0.13025), text_encoder=clip(n, 1, projection=False),
                                     text_encoder_2=clip(n, 2), tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
