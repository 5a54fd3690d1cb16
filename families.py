"""
families.py: the one table of facts about each backbone family; everything else about a backbone is
computed from it (models.py) and used through one code path by every script.

SD3 is an MM-DiT (`SD3Transformer2DModel`) trained with flow matching; SD1.5 and SDXL are UNets
(`UNet2DConditionModel`) trained with DDPM epsilon-prediction. What differs between them is where the
soft tokens go, how the noise is added and what the target is, how prompts are encoded, the shapes
of the denoiser, and the papers' hyper-parameters (SoftREPA Table 5 and appendix B; AGSM Table 11 and
section 4). FLUX.1 is an MM-DiT as SD3 (FluxTransformer2DModel, flow matching), in neither paper. The
tiny-* families are the offline shapes world (shapes/world.py; trained by shapes/pretrain.py, loaded by
shapes/backbones.py).
"""

import math

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
#   flow_shift, dynamic_shift  flow families: the sampler's time shift (time_shift below), SD3's constant;
#                FLUX-dev's (base tokens, base shift, max tokens, max shift) makes it grow with the image
#   pack         FLUX: the latents enter the denoiser as tokens of pack x pack latent pixels (models.denoise)
#   guidance     FLUX-dev: the value of its distilled-guidance input in training; sampling puts the cfg scale
#                there, one branch a step. None: no such input (CFG, where cfg != 1, runs two branches).
#   text_tokens  length of the text stream the denoiser reads; its width and the pooled width are read from
#                the denoiser's config (models.text_widths)
#   max_sequence_length  T5 families: the T5 positions in it (the pipelines' argument of that name; --max-
#                sequence-length changes it: with_text_length). SD3: 77 CLIP + 512 T5 = 589, as both authors'
#                codes encode (SoftREPA and AGSM sampler.py, max_length=512; SD3 does not mask T5's padding, so
#                the length changes predictions); the pipeline's default of 256 is the flag's other choice.
#                SD3.5 and FLUX (no paper): the pipelines' and model cards' lengths. None: no T5.
#   denoiser     the diffusers config of the denoiser at its real size: the hub checkpoint's, or for
#                tiny-* the shapes-world model that pretrain.py trains. Random weights of this config
#                are what bench.py times (the cost of a step does not depend on the weights).
#   test_denoiser  the same architecture at test size (tests; hooks' reference checks); tiny-*: None,
#                their real size is already small.
# A new family is one more entry here (tests/method/test_models.py registers two made-up ones).
FAMILIES = {
    "sd3": dict(
        arch="mmdit",
        prediction="flow",
        hub="stabilityai/stable-diffusion-3-medium-diffusers",
        pipeline="StableDiffusion3Pipeline",
        pooled="pooled_projections",
        size=1024,
        train_size=512,
        vae_factor=8,
        size_multiple=16,
        max_size=3072,
        flow_shift=3.0,
        dynamic_shift=None,
        pack=None,
        guidance=None,
        n_tokens=4,
        token_layers=5,
        token_blocks=None,
        time_table=True,
        init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=100000),
        text_tokens=589,
        max_sequence_length=512,
        denoiser=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
        ),
        test_denoiser=dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=16,
        ),
        sample=dict(steps=28, cfg=4.0),
    ),
    "sdxl": dict(
        arch="unet",
        prediction="epsilon",
        hub="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline",
        pooled="text_time",
        size=1024,
        train_size=512,
        vae_factor=8,
        size_multiple=32,
        max_size=None,
        flow_shift=None,
        dynamic_shift=None,
        pack=None,
        guidance=None,
        n_tokens=8,
        token_layers=1,
        token_blocks=("down", "mid"),
        time_table=False,
        init="normal",
        softrepa=dict(batch=4, dweight=10.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=1000),
        text_tokens=77,
        max_sequence_length=None,
        denoiser=dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        test_denoiser=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
        ),
        sample=dict(steps=50, cfg=7.0),
    ),
    "sd1.5": dict(
        arch="unet",
        prediction="epsilon",
        hub="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline="StableDiffusionPipeline",
        pooled=None,
        size=512,
        train_size=512,
        vae_factor=8,
        size_multiple=64,
        max_size=None,
        flow_shift=None,
        dynamic_shift=None,
        pack=None,
        guidance=None,
        n_tokens=4,
        token_layers=1,
        token_blocks=("down",),
        time_table=True,
        init="uncond",
        softrepa=dict(batch=8, dweight=10.0, steps=26000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=100000),
        text_tokens=77,
        max_sequence_length=None,
        denoiser=dict(sample_size=64, cross_attention_dim=768),  # the rest: UNet2DConditionModel's defaults
        test_denoiser=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        sample=dict(steps=30, cfg=7.0),
    ),
    # The offline shapes world (32x32 images, 8x8x4 latents). Same architectures, tiny sizes, our own weights.
    "tiny-sd3": dict(
        arch="mmdit",
        prediction="flow",
        hub=None,
        pipeline=None,
        pooled="pooled_projections",
        size=32,
        train_size=32,
        vae_factor=4,
        size_multiple=4,
        max_size=32,
        flow_shift=1.0,
        dynamic_shift=None,
        pack=None,
        guidance=None,
        n_tokens=4,
        token_layers=2,
        token_blocks=None,
        time_table=True,
        init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=300),
        text_tokens=16,
        max_sequence_length=None,
        denoiser=dict(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=128,
            pooled_projection_dim=128,
            pos_embed_max_size=8,
        ),
        test_denoiser=None,
        sample=dict(steps=20, cfg=4.0),
    ),
    "tiny-sd1.5": dict(
        arch="unet",
        prediction="epsilon",
        hub=None,
        pipeline=None,
        pooled=None,
        size=32,
        train_size=32,
        vae_factor=4,
        size_multiple=8,
        max_size=None,
        flow_shift=None,
        dynamic_shift=None,
        pack=None,
        guidance=None,
        n_tokens=4,
        token_layers=1,
        token_blocks=("down",),
        time_table=True,
        init="uncond",
        softrepa=dict(batch=4, dweight=10.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=300),
        text_tokens=16,
        max_sequence_length=None,
        denoiser=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        test_denoiser=None,
        sample=dict(steps=30, cfg=4.0),
    ),
}


# SD3.5 (not in either paper): SD3's SD3Transformer2DModel, text stream (77 CLIP + T5) and flow
# matching, so every fact is SD3's but the checkpoint's shapes, the model cards' sampling defaults and the
# pipeline's T5 length (256: no authors' code to follow).
# Medium adds dual attention in its first 13 blocks, both add QK-norm. The token layout and the training
# recipe are SD3's -- ours, not a paper's: no one has published soft tokens for SD3.5.
_SD3 = FAMILIES["sd3"]
_SD35_TEST = dict(_SD3["test_denoiser"], qk_norm="rms_norm")
FAMILIES["sd3.5-medium"] = dict(
    _SD3,
    hub="stabilityai/stable-diffusion-3.5-medium",
    max_size=6144,
    text_tokens=333,  # 77 CLIP + the pipeline's 256 T5 positions
    max_sequence_length=256,
    sample=dict(steps=40, cfg=4.5),
    denoiser=dict(
        _SD3["denoiser"], pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"
    ),
    test_denoiser=dict(_SD35_TEST, dual_attention_layers=(0, 1, 2)),
)
FAMILIES["sd3.5-large"] = dict(
    _SD3,
    hub="stabilityai/stable-diffusion-3.5-large",
    text_tokens=333,
    max_sequence_length=256,
    sample=dict(steps=28, cfg=3.5),
    denoiser=dict(
        _SD3["denoiser"], num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
    ),
    test_denoiser=_SD35_TEST,
)


# FLUX.1 (in neither paper): FluxTransformer2DModel, 19 double-stream blocks (SD3's joint block: own text
# and image weights, one attention) then 38 single-stream blocks (one stream of text and image). The soft
# tokens go into the first L double-stream blocks (hooks.py); the single-stream blocks see the plain text.
# Flow matching as SD3 (x_t = (1 - t) x0 + t eps, target v = eps - x0). The VAE's 16 latent channels
# (scaling_factor 0.3611, shift_factor 0.1159: read from its config) enter as tokens of 2 x 2 latent pixels
# (64 numbers; patch_size 1 inside) with rotary positions (models.denoise), so sides are multiples of
# 8 x 2 = 16 and no positional table bounds them. Text: T5-XXL's sequence (dev 512 positions, schnell 256:
# the model cards' max_sequence_length) and CLIP-L's pooled output (768) as the pooled input. dev is guidance-
# distilled: one branch per sampling step, the cfg scale fed to its guidance embedding, and the dynamic time
# shift (its scheduler config: use_dynamic_shifting); schnell is step-distilled: 4 steps, no guidance input,
# no shift (scheduler shift 1.0, use_dynamic_shifting false). The token layout and the training recipe are
# SD3's -- ours, not a paper's: no one has published soft tokens for FLUX.
# dev's guidance in training: 1.0, not the sampler's 3.5. Every loss here regresses the prediction onto the
# data's velocity eps - x0 (or a target built from it), which the distilled model predicts at guidance 1 (no
# guidance); at 3.5 it predicts a guided velocity, and score matching would push the tokens to undo the
# guidance. Fine-tuning scripts differ (1 or 3.5). The test size has 5 double-stream blocks, so that the
# recipe's 5 token layers run there unchanged.
_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
_FLUX_TEST = dict(
    _FLUX,
    num_layers=5,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(2, 2, 4),
)
FAMILIES["flux-dev"] = dict(
    _SD3,
    hub="black-forest-labs/FLUX.1-dev",
    pipeline="FluxPipeline",
    max_size=None,
    flow_shift=None,
    dynamic_shift=(256, 0.5, 4096, 1.15),
    pack=2,
    guidance=1.0,
    text_tokens=512,
    max_sequence_length=512,
    sample=dict(steps=28, cfg=3.5),
    denoiser=dict(_FLUX, guidance_embeds=True),
    test_denoiser=dict(_FLUX_TEST, guidance_embeds=True),
)
FAMILIES["flux-schnell"] = dict(
    FAMILIES["flux-dev"],
    hub="black-forest-labs/FLUX.1-schnell",
    flow_shift=1.0,
    dynamic_shift=None,
    guidance=None,
    text_tokens=256,
    max_sequence_length=256,
    sample=dict(steps=4, cfg=1.0),
    denoiser=dict(_FLUX, guidance_embeds=False),
    test_denoiser=dict(_FLUX_TEST, guidance_embeds=False),
)


# -----------------------------------------------------------------------------
# The flow samplers' time shift. A shift s multiplies every noise level's odds sigma / (1 - sigma) by s,
#     sigma' = s sigma / (1 + (s - 1) sigma),
# spending more steps at high noise, where a larger image needs them. SD3 uses a constant s = 3. FLUX-dev's
# grows with the image (FlowMatchEulerDiscreteScheduler with use_dynamic_shifting; mu: FluxPipeline's
# calculate_shift): mu is linear in the image tokens n, 0.5 at 256 tokens (256 px) to 1.15 at 4096 (1024 px),
#     sigma' = e^mu / (e^mu + (1 / sigma - 1)),
# which is the same odds shift with s = e^mu (e^1.15 = 3.16 at 1024 px, about SD3's 3).


def time_shift(facts, height, width):
    """The shift s for latents of height x width (flow families; 1: none)."""
    if facts["dynamic_shift"] is None:
        return facts["flow_shift"] or 1.0
    base_tokens, base_shift, max_tokens, max_shift = facts["dynamic_shift"]
    tokens = (height // facts["pack"]) * (width // facts["pack"])
    return math.exp(base_shift + (max_shift - base_shift) * (tokens - base_tokens) / (max_tokens - base_tokens))


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
            raise SystemExit(
                f"{what} {height}x{width or height} is beyond the loaded {name} model's positional "
                f"table ({config['pos_embed_max_size']} patches: {table} px at most); pass --size {table} "
                f"or less"
            )
    for side in (height, width if width is not None else height):
        if side < multiple or side % multiple or (largest and side > largest):
            limit = f" up to {largest}" if largest else ""
            raise SystemExit(
                f"{what} {height}x{width or height} does not fit {name}: it takes sides that are "
                f"multiples of {multiple}{limit}; pass --size with such a value"
            )


def with_text_length(facts, max_sequence_length):
    """The facts of a backbone whose text stream holds `max_sequence_length` T5 positions (--max-sequence-length;
    None: the family's): SD3's stream is 77 CLIP positions then T5's, FLUX's is T5's alone."""
    if max_sequence_length is None or max_sequence_length == facts["max_sequence_length"]:
        return facts
    clip = facts["text_tokens"] - facts["max_sequence_length"]  # SD3: 77, FLUX: 0
    return dict(facts, max_sequence_length=max_sequence_length, text_tokens=clip + max_sequence_length)
