"""
models.py: load a backbone by name and give every script one way to use it.

Backbones are stock diffusers denoisers. SD3 is an MM-DiT (`SD3Transformer2DModel`) trained with
flow matching; SD1.5 and SDXL are UNets (`UNet2DConditionModel`) trained with DDPM epsilon-prediction.
What differs between them is a handful of facts, kept in the one table `FAMILIES` below: where the
soft tokens go, how the noise is added and what the target is, how prompts are encoded, and the
papers' hyper-parameters (SoftREPA Table 5 and appendix B; AGSM Table 11 and section 4).
train.py, sample.py, edit.py and eval.py only ever call the functions of this file:

    bb = load("sd3")                           # or "tiny-sd3", or load("sd3", pretrained="/path")
    cond = encode_prompts(bb, ["a cat"])       # the denoiser's text kwargs
    x0 = encode_images(bb, images)             # images in [-1, 1] -> latents (identity for tiny-*)
    x_t, timesteps = add_noise(bb, x0, noise, u)   # u in [0, 1] is the noise level
    pred = denoise(bb, x_t, timesteps, cond)   # epsilon (DDPM) or velocity (flow)
    loss = (pred - target(bb, x0, noise)) ** 2

The tiny-* models are the offline "shapes world" (see shapes.py and pretrain.py): like the real
families they denoise VAE latents (a small AutoencoderKL, 32x32x3 <-> 8x8x4, shared by both tiny
families), with one small CLIP text encoder of a word-level vocabulary; weights shipped in weights/.
`tiny_denoiser(family)` builds random-weight denoisers with each real family's architecture for
the tests.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# The one table of per-family facts.
#   arch         "mmdit": tokens are prepended to the text stream of the first `token_layers`
#                transformer blocks (SoftREPA Alg. 1); "unet": tokens are inserted after BOS in
#                the text sequence seen by the cross-attention of `token_blocks`.
#   prediction   "epsilon" (DSM, DDPM schedule) or "flow" (velocity v = eps - x0, x_t = (1-t)x0 + t eps)
#   n_tokens, token_layers, time_table, init: the soft-token layout (SoftREPA app. B; AGSM sec. 4)
#   softrepa / agsm: the papers' training hyper-parameters; batch = images per step, so a step sees
#                batch x batch image-text pairs (SoftREPA Table 5 "16 (4, 12)" = 4 images x 4 texts).
#   sample:      paper sampling defaults (SoftREPA sec. 4, AGSM app. F).
#   vae_factor, size_multiple, max_size: image side -> latent side, and the sides the denoiser takes
#                (UNet: 2^(levels-1) latent pixels; MM-DiT: the patch, up to its positional table).
#                The latent normalisation (x0 = (z - shift) * scale) is not in this table: like the
#                stock pipelines we read it from the VAE's own config (scaling_factor, shift_factor).
FAMILIES = {
    "sd3": dict(
        arch="mmdit", prediction="flow", hub="stabilityai/stable-diffusion-3-medium-diffusers",
        pipeline="StableDiffusion3Pipeline", pooled="pooled_projections", size=1024,
        vae_factor=8, size_multiple=16, max_size=3072,
        flow_shift=3.0,
        n_tokens=4, token_layers=5, token_blocks=None, time_table=True, init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=100000),
        sample=dict(steps=28, cfg=4.0),
    ),
    "sdxl": dict(
        arch="unet", prediction="epsilon", hub="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline", pooled="text_time", size=1024,
        vae_factor=8, size_multiple=32, max_size=None,
        flow_shift=None,
        n_tokens=8, token_layers=1, token_blocks=("down", "mid"), time_table=False, init="normal",
        softrepa=dict(batch=4, dweight=10.0, steps=30000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=1000),
        sample=dict(steps=50, cfg=7.0),
    ),
    "sd1.5": dict(
        arch="unet", prediction="epsilon", hub="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline="StableDiffusionPipeline", pooled=None, size=512,
        vae_factor=8, size_multiple=64, max_size=None,
        flow_shift=None,
        n_tokens=4, token_layers=1, token_blocks=("down",), time_table=True, init="uncond",
        softrepa=dict(batch=8, dweight=10.0, steps=26000),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=100000),
        sample=dict(steps=30, cfg=7.0),
    ),
    # The offline shapes world (32x32 images, 8x8x4 latents). Same architectures, tiny sizes, our own weights.
    "tiny-sd3": dict(
        arch="mmdit", prediction="flow", hub=None, pipeline=None, pooled="pooled_projections", size=32,
        vae_factor=4, size_multiple=4, max_size=32,
        flow_shift=1.0,
        n_tokens=4, token_layers=2, token_blocks=None, time_table=True, init="normal",
        softrepa=dict(batch=4, dweight=0.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=0.1, steps=300),
        sample=dict(steps=20, cfg=4.0),
    ),
    "tiny-sd1.5": dict(
        arch="unet", prediction="epsilon", hub=None, pipeline=None, pooled=None, size=32,
        vae_factor=4, size_multiple=8, max_size=None,
        flow_shift=None,
        n_tokens=4, token_layers=1, token_blocks=("down",), time_table=True, init="uncond",
        softrepa=dict(batch=4, dweight=10.0, steps=300),
        agsm=dict(batch=4, gamma_pos=1.0, gamma_neg=1.0, steps=300),
        sample=dict(steps=30, cfg=4.0),
    ),
}
NUM_TRAIN_TIMESTEPS = 1000  # all three families: timesteps in [0, 1000) (SD3: sigma * 1000)
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclass
class Backbone:
    name: str
    facts: dict
    denoiser: nn.Module                 # SD3Transformer2DModel or UNet2DConditionModel
    pipe: object = None                 # real models: the stock diffusers pipeline (text encoders, VAE)
    text_encoder: nn.Module = None      # tiny models: one CLIPTextModel with our word vocabulary
    vae: nn.Module = None               # AutoencoderKL (real: pipe.vae); None: the denoiser works on pixels
    alphas_cumprod: torch.Tensor = field(default=None, repr=False)  # DDPM families

    def to(self, device, dtype=torch.float32):
        """Every module of the backbone to device / dtype (the VAE too: on CUDA one left behind fails at
        the first encode). fp32 is a device move only: diffusers warns on a no-op cast."""
        for module in (self.denoiser, self.text_encoder, self.vae):
            if module is not None:
                module.to(device) if dtype == torch.float32 else module.to(device, dtype)
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        return next(self.denoiser.parameters()).dtype


def check_name(name):
    """One-line error for an unknown model name, before anything heavy is loaded."""
    if name not in FAMILIES:
        raise SystemExit(f"unknown model '{name}': choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


# -----------------------------------------------------------------------------
# DDPM noise schedule of SD1.5/SDXL: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps
# (the schedulers' configs on the hub). alpha_bar_t = prod_{s<=t} (1 - beta_s).

def ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=NUM_TRAIN_TIMESTEPS):
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# -----------------------------------------------------------------------------
# Loading

def load(name, pretrained=None, device="cpu", dtype=torch.float32, text_encoder_3=True):
    """The backbone `name` (a key of FAMILIES). Real families come from the Hugging Face hub, or from
    `pretrained` (a local folder laid out as the hub repo). Tiny families come from weights/<name>/."""
    facts = check_name(name)
    if facts["hub"] is None:
        bb = load_tiny(name, pretrained or os.path.join(WEIGHTS_DIR, name))
        bb.to(device, dtype)
    else:
        import diffusers
        import transformers
        source = pretrained or facts["hub"]
        extra = {} if text_encoder_3 or facts["arch"] != "mmdit" else dict(text_encoder_3=None, tokenizer_3=None)
        if pretrained is not None and not os.path.isdir(pretrained):
            raise SystemExit(f"--pretrained {pretrained}: no such folder (a local copy of {facts['hub']})")
        diffusers.logging.set_verbosity_error()      # the one-line error below, not pages of warnings first
        transformers.logging.set_verbosity_error()
        try:
            pipe = getattr(diffusers, facts["pipeline"]).from_pretrained(source, torch_dtype=dtype, **extra)
        except (OSError, ValueError) as e:  # not on disk, and the hub is unreachable or gated
            if pretrained is not None:
                raise SystemExit(f"cannot load {name} from --pretrained {pretrained} ({type(e).__name__}): it must "
                                 f"be a complete local copy of {facts['hub']} (model_index.json and its "
                                 f"subfolders)") from None
            raise SystemExit(
                f"cannot load {name} from the hub '{source}' ({type(e).__name__}): if offline, pass --pretrained "
                f"/path/to/a/local/copy; if online, run `hf auth login` and accept the licence at "
                f"https://huggingface.co/{facts['hub']}") from None
        pipe.to(device)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        denoiser = pipe.transformer if facts["arch"] == "mmdit" else pipe.unet
        bb = Backbone(name, facts, denoiser, pipe=pipe, vae=pipe.vae)
    for module in (bb.denoiser, bb.text_encoder, bb.vae):
        if module is not None:
            module.requires_grad_(False).eval()
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = ddpm_alphas_cumprod().to(device)
    return bb


# Tiny configurations, built from configs in code. The shapes-world ones are what pretrain.py trains;
# `tiny_denoiser` gives each real family's architecture at test size.
TINY_TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=16, projection_dim=128)
# The shapes world's autoencoder: the real families' AutoencoderKL at 0.23M parameters. Three blocks halve
# the side twice, 32x32x3 -> 8x8x4 (vae_factor 4); the denoisers then see 64 latent positions and the
# decoder draws the crisp edges (a pixel-space denoiser of the same cost drew blocky fragments). No
# attention in its middle block: 64 positions of flat colours need none. scaling_factor / shift_factor
# are measured on renders after training (pretrain.py) and saved with the weights, as in the hub configs.
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                       down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                       layers_per_block=1, norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
TINY_DENOISER_CONFIGS = {
    # Sized for CPU pretraining (pretrain.py) and CPU token training: patch 1 on the 8x8 latents gives the
    # DiT 64 image tokens; the UNet has two levels (8x8 and 4x4), cross-attention at both.
    "tiny-sd3": dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                     attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                     caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=8),
    "tiny-sd1.5": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(32, 64),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=128, attention_head_dim=8, norm_num_groups=8),
    # test-size versions of the real families (random weights; the tests build their text features)
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8),
    "sd1.5": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}


# The real denoisers at full size (the diffusers configs of the hub checkpoints), for timing with random
# weights (bench.py, sample.py --bench): the cost of a step does not depend on the weights.
REAL_DENOISER_CONFIGS = {
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd1.5": dict(sample_size=64, cross_attention_dim=768),  # the rest: UNet2DConditionModel's defaults
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def real_size_backbone(name, seed=0):
    """A real family's denoiser at full size with random weights, and no text encoders or VAE."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    facts = check_name(name)
    cls = SD3Transformer2DModel if facts["arch"] == "mmdit" else UNet2DConditionModel
    torch.manual_seed(seed)
    bb = Backbone(name, facts, cls(**REAL_DENOISER_CONFIGS[name]).eval().requires_grad_(False))
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = ddpm_alphas_cumprod()
    return bb


def tiny_denoiser(name, seed=0, **overrides):
    """A random-weight denoiser with the architecture of family `name` at a small size."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    config = {**TINY_DENOISER_CONFIGS[name], **overrides}
    torch.manual_seed(seed)
    cls = SD3Transformer2DModel if FAMILIES[name]["arch"] == "mmdit" else UNet2DConditionModel
    return cls(**config).eval()


def tiny_text_encoder(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    import shapes
    # CLIP pools the hidden state at the EOS token (the summary of the prompt); shapes.py explains ids
    ids = shapes.WORD_TO_ID
    config = CLIPTextConfig(vocab_size=len(shapes.VOCAB), pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                            eos_token_id=ids["<eos>"], **TINY_TEXT_CONFIG)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_vae(seed=0, scaling_factor=1.0, shift_factor=0.0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG, scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def build_tiny(name, seed=0, vae=None):
    """A random-weight shapes-world backbone (what pretrain.py starts from); `vae` defaults to a random one."""
    facts = check_name(name)
    bb = Backbone(name, facts, tiny_denoiser(name, seed), text_encoder=tiny_text_encoder(seed + 1),
                  vae=vae if vae is not None else tiny_vae(seed + 2))
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = ddpm_alphas_cumprod()
    return bb


TINY_VAE_DIR = os.path.join(WEIGHTS_DIR, "tiny-vae")


def load_tiny_vae(folder=TINY_VAE_DIR):
    """The trained shapes-world autoencoder, with the latent normalisation stored beside its weights."""
    from safetensors import safe_open
    path = os.path.join(folder, "vae.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"no autoencoder weights at {path}; rebuild them with `python pretrain.py --model tiny-vae`")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    vae = tiny_vae(scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]))
    vae.load_state_dict(state)
    return vae


def save_tiny_vae(vae, folder=TINY_VAE_DIR):
    save_weights(vae, os.path.join(folder, "vae.safetensors"), model="tiny-vae",
                 scaling_factor=str(vae.config.scaling_factor), shift_factor=str(vae.config.shift_factor))


def load_tiny(name, folder):
    """weights/<name>/{denoiser,text_encoder}.safetensors, and the shared autoencoder beside them."""
    from safetensors.torch import load_file
    files = {part: os.path.join(folder, f"{part}.safetensors") for part in ("denoiser", "text_encoder")}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise SystemExit(f"{name}: no weights at {missing[0]}; rebuild them with `python pretrain.py --model {name}`")
    vae_folder = os.path.join(os.path.dirname(os.path.abspath(folder)), "tiny-vae")
    bb = build_tiny(name, vae=load_tiny_vae(vae_folder if os.path.isdir(vae_folder) else TINY_VAE_DIR))
    bb.denoiser.load_state_dict(load_file(files["denoiser"]))
    bb.text_encoder.load_state_dict(load_file(files["text_encoder"]))
    return bb


def save_weights(module, path, **metadata):
    """A module's weights as fp32 safetensors, written atomically (a crash keeps the previous file)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".tmp")
    save_file(state, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def save_tiny(bb, folder):
    for part, module in (("denoiser", bb.denoiser), ("text_encoder", bb.text_encoder)):
        save_weights(module, os.path.join(folder, f"{part}.safetensors"), model=bb.name)


# -----------------------------------------------------------------------------
# Prompts: the text kwargs of the denoiser for a list of prompts. Real families use the stock
# pipeline's own `encode_prompt` (the exact text features the models were trained with).

def encode_prompts(bb, prompts, grad=False):
    """grad=True only for pretrain.py, which trains the tiny text encoder; everywhere else it is frozen."""
    facts, device = bb.facts, bb.device
    with torch.set_grad_enabled(grad):
        if bb.pipe is None:
            import shapes
            out = bb.text_encoder(shapes.tokenize(prompts).to(device))
            hidden, pooled = out.last_hidden_state, out.pooler_output
        elif facts["arch"] == "mmdit":
            hidden, _, pooled, _ = bb.pipe.encode_prompt(prompts, None, None, device=device,
                                                         do_classifier_free_guidance=False)
        elif facts["pooled"] == "text_time":
            hidden, _, pooled, _ = bb.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        else:
            hidden, _ = bb.pipe.encode_prompt(prompts, device, 1, False)
            pooled = None
    return cond_from_features(bb, hidden, pooled)


def cond_from_features(bb, hidden, pooled):
    """The denoiser's text kwargs from text-encoder features (also used by data.py's encoding cache)."""
    facts = bb.facts
    cond = {"encoder_hidden_states": hidden}
    if facts["pooled"] == "pooled_projections":
        cond["pooled_projections"] = pooled
    elif facts["pooled"] == "text_time":
        # SDXL micro-conditioning: (original size, crop top-left, target size), all at the training size
        size = facts["size"]
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=hidden.device, dtype=hidden.dtype)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(hidden), 1)}
    return cond


def index_cond(cond, index):
    """Rows `index` of every tensor in a conditioning dict (used to build the B x B pair matrix)."""
    return {k: index_cond(v, index) if isinstance(v, dict) else v[index] for k, v in cond.items()}


def cat_conds(conds):
    """Concatenate conditioning dicts along the batch (e.g. unconditional + conditional for CFG)."""
    first = conds[0]
    return {k: cat_conds([c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
            for k, v in first.items()}


# -----------------------------------------------------------------------------
# Images <-> latents, one path for every family: the AutoencoderKL, then the normalisation of its config,
# x0 = (z - shift_factor) * scaling_factor (SD3: shift 0.0609, scale 1.5305; SD1.5: no shift, 0.18215),
# chosen so that the latents the denoiser sees have about zero mean and unit variance.

def latent_normalisation(vae):
    return vae.config.scaling_factor, (getattr(vae.config, "shift_factor", None) or 0.0)


def encode_images(bb, images, mode=False):
    """images (B, 3, H, W) in [-1, 1] -> latents x0: a sample of the VAE posterior, as in training,
    or with mode=True its mean (deterministic; what image editing starts from)."""
    if bb.vae is None:
        return images.to(bb.device, bb.dtype)
    scale, shift = latent_normalisation(bb.vae)
    with torch.no_grad():
        posterior = bb.vae.encode(images.to(bb.device, bb.vae.dtype)).latent_dist
        z = posterior.mode() if mode else posterior.sample()
    return ((z - shift) * scale).to(bb.dtype)


def decode_latents(bb, latents):
    """latents -> images (B, 3, H, W) in [-1, 1]."""
    if bb.vae is None:
        return latents.clamp(-1, 1)
    scale, shift = latent_normalisation(bb.vae)
    with torch.no_grad():
        return bb.vae.decode((latents / scale + shift).to(bb.vae.dtype)).sample.clamp(-1, 1)


def latent_shape(bb, size=None):
    size = size or bb.facts["size"]
    factor = bb.facts["vae_factor"]
    return (bb.denoiser.config.in_channels, size // factor, size // factor)


# -----------------------------------------------------------------------------
# Forward process and targets. A noise level u in [0, 1] is drawn per image; both families map it
# to the denoiser's timestep in [0, 1000), the scale the soft tokens' time table is indexed by.
#   DDPM (SD1.5/SDXL):  t = floor(1000 u),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  target eps
#   flow (SD3):         sigma = u,          x_t = (1 - sigma) x0 + sigma eps,  target v = eps - x0,
#                       timestep = 1000 sigma (SD3's convention; SoftREPA eq. 11 / AGSM eq. 38)

def add_noise(bb, x0, noise, u):
    """x_t and the denoiser's timesteps for clean x0 (B, ...), noise like x0, levels u (B,) in [0, 1]."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if bb.facts["prediction"] == "flow":
        sigma = u.to(x0.device, torch.float32)
        x_t = (1 - sigma.view(shape)) * x0.float() + sigma.view(shape) * noise.float()
        return x_t.to(x0.dtype), sigma * NUM_TRAIN_TIMESTEPS
    t = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1).to(x0.device)
    abar = bb.alphas_cumprod.to(x0.device)[t].view(shape)
    x_t = abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()
    return x_t.to(x0.dtype), t


def target(bb, x0, noise):
    """What the denoiser is trained to predict: eps (DSM) or the velocity eps - x0 (flow matching)."""
    return noise if bb.facts["prediction"] == "epsilon" else noise - x0


def denoise(bb, x_t, timesteps, cond):
    """One call of the stock denoiser. Hooks attached with hooks.attach act inside this call."""
    if not torch.is_tensor(timesteps) or timesteps.dim() == 0:
        timesteps = torch.full((x_t.shape[0],), float(timesteps), device=x_t.device)
    return bb.denoiser(x_t, timestep=timesteps, **cond, return_dict=False)[0]
