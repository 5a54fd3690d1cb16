"""Stock diffusers pipelines built offline from random tiny components (no hub): a character-level
CLIP tokenizer written to a folder, tiny CLIP text encoders, a one-level VAE and tiny denoisers."""
import json

import torch


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), len(vocab)


def clip(vocab_size, seed, projection=True):
    """eos_token_id=2: CLIP pools at the argmax id, the last of this vocabulary (EOS)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                              bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1)).eval()


def vae(**extra):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), sample_size=16, **extra).eval()


def sd3_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    tokenizer, n = clip_tokenizer(folder)
    torch.manual_seed(0)  # joint_attention_dim 32 = the two CLIPs' 16 + 16 hidden widths; pooled 16 + 16
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=clip(n, 1), tokenizer=tokenizer,
        text_encoder_2=clip(n, 2), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    tokenizer, n = clip_tokenizer(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=vae(scaling_factor=0.18215), text_encoder=clip(n, 1, projection=False),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    tokenizer, n = clip_tokenizer(folder)
    torch.manual_seed(0)  # cross-attention 32 = the two encoders' 16 + 16; added embedding 16 + 6 x 8
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=(1, 2),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=16 + 6 * 8).eval()
    pipe = StableDiffusionXLPipeline(vae=vae(scaling_factor=0.13025), text_encoder=clip(n, 1, projection=False),
                                     text_encoder_2=clip(n, 2), tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
