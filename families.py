"""
families.py: the one table of facts about each backbone family; everything else about a backbone is
computed from it (models.py) and used through one code path by every script.

SD3 is an MM-DiT (`SD3Transformer2DModel`) trained with flow matching; SD1.5 and SDXL are UNets
(`UNet2DConditionModel`) trained with DDPM epsilon-prediction. What differs between them is where the
soft tokens go, how the noise is added and what the target is, how prompts are encoded, the shapes
of the denoiser, and the papers' hyper-parameters (SoftREPA Table 5 and appendix B; AGSM Table 11 and
section 4). The tiny-* families are the offline shapes world (shapes.py, pretrain.py).
"""
# The fields:
#   arch         "mmdit": tokens are prepended to the text stream of the first `token_layers`
#                transformer blocks (SoftREPA Alg. 1); "unet": tokens are inserted after BOS in
#                the text sequence seen by the cross-attention of `token_blocks`.
#   prediction   "epsilon" (DSM, DDPM schedule) or "flow" (velocity v = eps - x0, x_t = (1-t)x0 + t eps)
#   n_tokens, token_layers, time_table, init: the soft-token layout (SoftREPA app. B; AGSM sec. 4)
#   softrepa / agsm: the papers' training hyper-parameters; batch = images per step, so a step sees
#                batch x batch image-text pairs (SoftREPA Table 5 "16 (4, 12)" = 4 images x 4 texts).
#   sample:      paper sampling defaults (SoftREPA sec. 4, AGSM app. F).
#   size         the native image side (sampling, editing); train_size: the side the authors TRAIN at --
#                512 px for every real family in both codes (SoftREPA train.py --img_size 512, never
#                overridden by its scripts; AGSM scripts/train_coco.sh DEFAULT_IMG_SIZE=512), though SDXL
#                and SD3 sample at 1024. Neither paper states it (Table 11, SoftREPA Table 5): the code rules.
#   vae_factor, size_multiple, max_size: image side -> latent side, and the sides the denoiser takes
#                (UNet: 2^(levels-1) latent pixels; MM-DiT: the patch, up to its positional table).
#                The latent normalisation (x0 = (z - shift) * scale) is not in this table: like the
#                stock pipelines we read it from the VAE's own config (scaling_factor, shift_factor).
#   text_tokens  length of the text stream the denoiser reads (SD3: 77 CLIP + 256 T5 positions); its
#                width and the pooled width are read from the denoiser's config (models.text_widths)
#   denoiser     the diffusers config of the denoiser at its real size: the hub checkpoint's, or for
#                tiny-* the shapes-world model that pretrain.py trains. Random weights of this config
#                are what bench.py times (the cost of a step does not depend on the weights).
#   test_denoiser  the same architecture at test size (tests; hooks' reference checks); tiny-*: None,
#                their real size is already small.
# A new family is one more entry here (tests/test_models.py registers two made-up ones).
FAMILIES = {
    "sd3": dict(
        arch="mmdit", prediction="flow", hub="stabilityai/stable-diffusion-3-medium-diffusers",
        pipeline="StableDiffusion3Pipeline", pooled="pooled_projections", size=1024, train_size=512,
        vae_factor=8, size_multiple=16, max_size=3072,
        flow_shift=3.0,
        n_tokens=4, token_layers=5, token_blocks=None, time_table=True, init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=100000),
        text_tokens=333,
        denoiser=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                      caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        test_denoiser=dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                           attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                           caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16),
        sample=dict(steps=28, cfg=4.0),
    ),
    "sdxl": dict(
        arch="unet", prediction="epsilon", hub="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline", pooled="text_time", size=1024, train_size=512,
        vae_factor=8, size_multiple=32, max_size=None,
        flow_shift=None,
        n_tokens=8, token_layers=1, token_blocks=("down", "mid"), time_table=False, init="normal",
        softrepa=dict(batch=4, dweight=10.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=1000),
        text_tokens=77,
        denoiser=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        test_denoiser=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                           attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=(1, 2),
                           addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=16 + 6 * 8),
        sample=dict(steps=50, cfg=7.0),
    ),
    "sd1.5": dict(
        arch="unet", prediction="epsilon", hub="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline="StableDiffusionPipeline", pooled=None, size=512, train_size=512,
        vae_factor=8, size_multiple=64, max_size=None,
        flow_shift=None,
        n_tokens=4, token_layers=1, token_blocks=("down",), time_table=True, init="uncond",
        softrepa=dict(batch=8, dweight=10.0, steps=26000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=100000),
        text_tokens=77,
        denoiser=dict(sample_size=64, cross_attention_dim=768),   # the rest: UNet2DConditionModel's defaults
        test_denoiser=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                           attention_head_dim=4, norm_num_groups=8),
        sample=dict(steps=30, cfg=7.0),
    ),
    # The offline shapes world (32x32 images, 8x8x4 latents). Same architectures, tiny sizes, our own weights.
    "tiny-sd3": dict(
        arch="mmdit", prediction="flow", hub=None, pipeline=None, pooled="pooled_projections", size=32, train_size=32,
        vae_factor=4, size_multiple=4, max_size=32,
        flow_shift=1.0,
        n_tokens=4, token_layers=2, token_blocks=None, time_table=True, init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=300),
        text_tokens=16,
        denoiser=dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                      attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                      caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=8),
        test_denoiser=None,
        sample=dict(steps=20, cfg=4.0),
    ),
    "tiny-sd1.5": dict(
        arch="unet", prediction="epsilon", hub=None, pipeline=None, pooled=None, size=32, train_size=32,
        vae_factor=4, size_multiple=8, max_size=None,
        flow_shift=None,
        n_tokens=4, token_layers=1, token_blocks=("down",), time_table=True, init="uncond",
        softrepa=dict(batch=4, dweight=10.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=300),
        text_tokens=16,
        denoiser=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=128, attention_head_dim=8, norm_num_groups=8),
        test_denoiser=None,
        sample=dict(steps=30, cfg=4.0),
    ),
}


# SD3.5 (not in either paper): SD3's SD3Transformer2DModel, text stream (77 CLIP + 256 T5) and flow
# matching, so every fact is SD3's but the checkpoint's shapes and the model cards' sampling defaults.
# Medium adds dual attention in its first 13 blocks, both add QK-norm. The token layout and the training
# recipe are SD3's -- ours, not a paper's: no one has published soft tokens for SD3.5.
_SD3 = FAMILIES["sd3"]
_SD35_TEST = dict(_SD3["test_denoiser"], qk_norm="rms_norm")
FAMILIES["sd3.5-medium"] = dict(
    _SD3, hub="stabilityai/stable-diffusion-3.5-medium", max_size=6144, sample=dict(steps=40, cfg=4.5),
    denoiser=dict(_SD3["denoiser"], pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    test_denoiser=dict(_SD35_TEST, dual_attention_layers=(0, 1, 2)))
FAMILIES["sd3.5-large"] = dict(
    _SD3, hub="stabilityai/stable-diffusion-3.5-large", sample=dict(steps=28, cfg=3.5),
    denoiser=dict(_SD3["denoiser"], num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  qk_norm="rms_norm"),
    test_denoiser=_SD35_TEST)


# -----------------------------------------------------------------------------
# The sizes a family takes: the one rule of every script

def check_size(name, height, width=None, what="size", bb=None):
    """One-line error for an image size the family cannot take: the one rule of every script (train,
    sample, edit, the encoding cache, bench). With the loaded backbone `bb`, also the sides its own
    positional table reaches (an MM-DiT's pos_embed_max_size patches; a checkpoint may hold a smaller
    one than the family's), before any heavy work."""
    multiple, largest = FAMILIES[name]["size_multiple"], FAMILIES[name]["max_size"]
    config = getattr(bb.denoiser, "config", {}) if bb is not None else {}
    if config.get("pos_embed_max_size"):
        table = config["pos_embed_max_size"] * config["patch_size"] * FAMILIES[name]["vae_factor"]
        if max(height, width or height) > table:
            raise SystemExit(f"{what} {height}x{width or height} is beyond the loaded {name} model's positional "
                             f"table ({config['pos_embed_max_size']} patches: {table} px at most); pass --size {table} "
                             f"or less")
    for side in (height, width if width is not None else height):
        if side < multiple or side % multiple or (largest and side > largest):
            limit = f" up to {largest}" if largest else ""
            raise SystemExit(f"{what} {height}x{width or height} does not fit {name}: it takes sides that are "
                             f"multiples of {multiple}{limit}; pass --size with such a value")
