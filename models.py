"""
models.py: load a backbone by name and give every script one way to use it.

Backbones are stock diffusers denoisers: MM-DiTs trained with flow matching (SD3, SD3.5:
`SD3Transformer2DModel`; FLUX.1: `FluxTransformer2DModel`) and UNets trained with DDPM epsilon-prediction
(SD1.5, SDXL: `UNet2DConditionModel`). What differs between them is a handful of facts, kept in the one
table `FAMILIES` (families.py): where the soft tokens go, how the noise is added and what the target is,
how prompts are encoded, the denoiser's shapes, and the papers' hyper-parameters; the functions here read
them. The scripts use backbones only through the functions of this file:

    bb = load("sd3")                           # or load("sd3", pretrained="/path"); tiny-*: shapes.backbones
    cond = encode_prompts(bb, ["a cat"])       # the denoiser's text kwargs
    x0 = encode_images(bb, images)             # images in [-1, 1] -> latents (the VAE)
    x_t, timesteps = add_noise(bb, x0, noise, u)   # u in [0, 1] is the noise level
    pred = denoise(bb, x_t, timesteps, cond)   # epsilon (DDPM) or velocity (flow)
    loss = (pred - target(bb, x0, noise)) ** 2

The tiny-* families are the offline "shapes world": the same classes at tiny sizes, with a small CLIP
text encoder of a word-level vocabulary. The method knows no world of its own, so they are loaded by
shapes/backbones.py, which the scripts hand to `from_flags` (the one place a script chooses the world);
the Backbone it returns carries its own `tokenize`.
`random_denoiser(family, size)` builds any family's denoiser with random weights at its real size
(benchmarks) or test size (tests); `from_flags(args)` is what the scripts' flags ask for.
"""

import inspect
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import families
import files
import flags
from families import FAMILIES  # the one table of per-family facts

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # every script's --precision
NUM_TRAIN_TIMESTEPS = 1000  # every family: timesteps in [0, 1000) (flow: sigma * 1000)


@dataclass
class Backbone:
    name: str
    facts: dict
    denoiser: nn.Module  # SD3Transformer2DModel, FluxTransformer2DModel or UNet2DConditionModel
    pipe: object = None  # real models: the stock diffusers pipeline (text encoders, VAE)
    text_encoder: nn.Module = None  # tiny models: one CLIPTextModel with their word vocabulary
    tokenize: object = None  # tiny models: list[str] -> the input ids of text_encoder
    vae: nn.Module = None  # AutoencoderKL (real: pipe.vae); None: the denoiser works on pixels
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

    device = property(lambda self: next(self.denoiser.parameters()).device)
    dtype = property(lambda self: next(self.denoiser.parameters()).dtype)


def check_name(name):
    """One-line error for an unknown model name, before anything heavy is loaded."""
    if name not in FAMILIES:
        raise SystemExit(f"unknown model '{name}': choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


# -----------------------------------------------------------------------------
# DDPM noise schedule of SD1.5/SDXL: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps
# (the schedulers' configs on the hub). alpha_bar_t = prod_{s<=t} (1 - beta_s).


def ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=NUM_TRAIN_TIMESTEPS):
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# -----------------------------------------------------------------------------
# Loading


def load(name, pretrained=None, device="cpu", dtype=torch.float32, text_encoder_3=True, max_sequence_length=None):
    """The backbone `name` (a key of FAMILIES, a real family) from the Hugging Face hub, or from `pretrained`
    (a local folder laid out as the hub repo), its text stream `max_sequence_length` T5 positions long (None: the
    family's). The shapes world's tiny families: shapes.backbones.load."""
    facts = families.with_text_length(check_name(name), max_sequence_length)
    if is_shapes_world(name):
        raise SystemExit(f"{name} is a shapes-world backbone: load it with shapes.backbones.load")
    import diffusers
    import transformers

    source = pretrained or facts["hub"]
    extra = {} if text_encoder_3 or facts["arch"] != "mmdit" else dict(text_encoder_3=None, tokenizer_3=None)
    if pretrained is not None:  # its configs name the family's classes, checked before any weight loads
        files.check_pretrained(pretrained, name, facts["pipeline"], denoiser_class(facts).__name__, facts["hub"])
        check_variant(pretrained, name)
    diffusers.logging.set_verbosity_error()  # the one-line error below, not pages of warnings first
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # newer diffusers name torch_dtype `dtype`; older ones know only this
            warnings.simplefilter("ignore", FutureWarning)
            pipe = getattr(diffusers, facts["pipeline"]).from_pretrained(source, torch_dtype=dtype, **extra)
    except (OSError, ValueError) as e:  # not on disk, and the hub is unreachable or gated
        if pretrained is not None:
            raise SystemExit(
                f"cannot load {name} from --pretrained {pretrained} ({type(e).__name__}): it must "
                f"be a complete local copy of {facts['hub']} (model_index.json and its "
                f"subfolders)"
            ) from None
        raise SystemExit(
            f"cannot load {name} from the hub '{source}' ({type(e).__name__}): if offline, pass --pretrained "
            f"/path/to/a/local/copy; if online, run `hf auth login` and accept the licence at "
            f"https://huggingface.co/{facts['hub']}"
        ) from None
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    denoiser = pipe.transformer if facts["arch"] == "mmdit" else pipe.unet
    bb = Backbone(name, facts, denoiser, pipe=pipe, vae=pipe.vae)
    bb.denoiser.requires_grad_(False).eval()
    if facts["prediction"] == "epsilon":
        bb.alphas_cumprod = ddpm_alphas_cumprod().to(device)
    return bb


def check_variant(folder, name):
    """--pretrained FOLDER of a family that shares its pipeline and denoiser class with others (SD3, SD3.5
    Medium and Large: StableDiffusion3Pipeline; FLUX.1 dev and schnell: FluxPipeline) is told apart by the
    denoiser config's keys on which those families differ (QK-norm, dual attention, guidance input), read
    from the table (FAMILIES: their real and test configs) before any weight loads."""
    facts = FAMILIES[name]
    part = "transformer" if facts["arch"] == "mmdit" else "unet"
    siblings = [n for n, f in FAMILIES.items() if f["hub"] and f["pipeline"] == facts["pipeline"]]
    configs = {n: [denoiser_config(n, size) for size in ("real", "test")] for n in siblings}
    values = lambda config, key: tuple(v) if isinstance(v := config.get(key), (list, tuple)) else v  # noqa: E731
    telling = [k for k in TELLING_KEYS if len({values(c, k) for n in siblings for c in configs[n]}) > 1]
    if not telling:
        return
    found = files.read_json(os.path.join(folder, part, "config.json"), f"the {part} config of a {name} folder")
    signature = inspect.signature(denoiser_class(facts).__init__).parameters.values()
    found = {**{p.name: p.default for p in signature}, **found}  # a key its config lacks: the class default
    fits = [n for n in siblings if any(all(values(found, k) == values(c, k) for k in telling) for c in configs[n])]
    if fits and name not in fits:
        shown = ", ".join(f"{k} {found.get(k)!r}" for k in telling)
        raise SystemExit(
            f"--pretrained {folder}: its {part} ({shown}) is {' or '.join(fits)}'s, not {name}'s: pass "
            f"--model {fits[0]}, or a local copy of {facts['hub']}"
        )


# the denoiser config keys that tell apart families of one pipeline (check_variant); sizes are not among
# them, so that a copy at another size (a test pipeline) is told apart as well as the hub's
TELLING_KEYS = ("qk_norm", "dual_attention_layers", "guidance_embeds")


def denoiser_class(facts):
    import diffusers

    return getattr(
        diffusers,
        "FluxTransformer2DModel"
        if facts["pack"]
        else "SD3Transformer2DModel"
        if facts["arch"] == "mmdit"
        else "UNet2DConditionModel",
    )


def sized_config(facts, size):
    """The family's denoiser config at its real size, or at test size (tiny-*: the same)."""
    return facts["test_denoiser"] if size == "test" and facts["test_denoiser"] is not None else facts["denoiser"]


def denoiser_config(name, size="real"):
    """The family's denoiser config at its real or test size, with the class's defaults filled in (so
    that facts like the text width can be read without building a multi-GB model)."""
    facts = check_name(name)
    config = sized_config(facts, size)
    signature = inspect.signature(denoiser_class(facts).__init__).parameters.values()
    return {**{p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}, **config}


def random_denoiser(name, size="real", seed=0, **overrides):
    """A denoiser of family `name` with random weights: its real size (size="real": the hub config, or
    for tiny-* the shapes-world model) or its test size (size="test"; tiny-*: the same as real)."""
    facts = check_name(name)
    torch.manual_seed(seed)
    return denoiser_class(facts)(**{**sized_config(facts, size), **overrides}).eval()


def random_denoiser_on_meta(name):
    """The family's real-size denoiser on the meta device: its parameter count without allocating it."""
    with torch.device("meta"):
        return denoiser_class(check_name(name))(**sized_config(check_name(name), "real"))


def random_backbone(name, size="real", seed=0):
    """A real family's backbone with random weights: the denoiser alone, without text encoders or VAE
    (text features then come from random_text). The shapes world's: shapes.backbones.build_tiny."""
    bb = Backbone(name, check_name(name), random_denoiser(name, size, seed).requires_grad_(False))
    if bb.facts["prediction"] == "epsilon":
        bb.alphas_cumprod = ddpm_alphas_cumprod()
    return bb


def text_widths(config):
    """(width of the text stream, width of the pooled text feature or None) from a denoiser config
    (a built model's .config, or denoiser_config): MM-DiT joint_attention_dim / pooled_projection_dim; UNet
    cross_attention_dim, and for SDXL the added embedding less its 6 time ids (2816 - 6 * 256 = 1280)."""
    if "joint_attention_dim" in config:
        return config["joint_attention_dim"], config["pooled_projection_dim"]
    pooled = None
    if config["addition_embed_type"] == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return config["cross_attention_dim"], pooled


def feature_shapes(name, size=None):
    """(latent (C, h, w), text (tokens, width), pooled width or 0) of family `name` at image side `size`:
    what the encoding cache stores per sample (data.py)."""
    facts, config = check_name(name), denoiser_config(name)
    side = (size or facts["train_size"]) // facts["vae_factor"]
    width, pooled = text_widths(config)
    return (config["in_channels"] // (facts["pack"] or 1) ** 2, side, side), (facts["text_tokens"], width), pooled or 0


def random_text_features(bb, batch, seed=0):
    """(hidden (batch, tokens, width), pooled (batch, width) or None) of the family's real shapes with
    random values, on the CPU: what the encoding cache stores (bench.py times steps with them)."""
    g = torch.Generator().manual_seed(seed)
    width, pooled_width = text_widths(bb.denoiser.config)
    hidden = torch.randn(batch, bb.facts["text_tokens"], width, generator=g)
    return hidden, None if pooled_width is None else torch.randn(batch, pooled_width, generator=g)


def random_text(bb, batch, seed=0):
    """The denoiser's text kwargs from random_text_features, for a backbone without text encoders."""
    hidden, pooled = random_text_features(bb, batch, seed)
    return cond_from_features(
        bb, hidden.to(bb.device, bb.dtype), None if pooled is None else pooled.to(bb.device, bb.dtype)
    )


def is_shapes_world(name):
    """The one test of "is this a tiny shapes-world model?": a family with no hub checkpoint."""
    return check_name(name)["hub"] is None


def add_backbone_flags(parser, precision="fp16 on a GPU, fp32 on the CPU"):
    """The flags that pick and place a backbone, the same in every script (read by from_flags)."""
    parser.add_argument("--model", default="tiny-sd3", help=f"one of {', '.join(FAMILIES)}")
    parser.add_argument(
        "--pretrained", default=None, help="local folder of the backbone (default: the hub / shapes/weights/)"
    )
    parser.add_argument("--random-init", action="store_true", help="tiny-* only: random weights (tests)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS), help=f"default: {precision}")
    parser.add_argument("--threads", type=flags.THREADS, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--max-sequence-length",
        type=flags.POSITIVE_INT,
        default=None,
        help="T5 positions of the text stream (SD3, SD3.5, FLUX; default: the family's, families.py -- SD3: 512 "
        "as the authors' codes, 256 as the stock pipeline)",
    )


def check_backbone_flags(args):
    """One-line errors of the backbone flags, before anything heavy; fills in --device. (train.py: --model is None
    until a resumed run's checkpoint or the recipe says; it calls this again once it is known.)"""
    if args.model is not None:
        facts = check_name(args.model)
        if getattr(args, "max_sequence_length", None) and facts["max_sequence_length"] is None:
            raise SystemExit(f"--max-sequence-length sets T5's positions, and {args.model} reads no T5: drop it")
        if args.random_init and not is_shapes_world(args.model):
            raise SystemExit("--random-init builds a tiny shapes-world backbone: use it with tiny-sd3 or tiny-sd1.5")
    args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)


def devices_here():
    """The devices this machine has, as --device names them: cpu, then cuda:N, mps."""
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return here + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(name, flag="--device"):
    """Every script's --device, checked before anything loads: a name torch does not know, or a device this
    machine does not have (cuda on a machine without a GPU or on a CPU build of torch, cuda:7 of 1 GPU, mps off a
    Mac), is one line naming the devices there are. Returns `name`."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"{flag} {name!r}: not a device name; pass one of {', '.join(devices_here())}") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            why = "this torch is a CPU build, without CUDA"
        elif not torch.cuda.is_available():
            why = "no CUDA GPU is visible here"
        elif device.index is not None and device.index >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        else:
            return name
    elif device.type == "mps":
        if torch.backends.mps.is_available():
            return name
        why = "mps is Apple's GPU, and there is none here"
    else:
        why = f"the scripts compute on cpu, cuda or mps, not {device.type}"
    raise SystemExit(f"{flag} {name}: no such device ({why}); pass one of {', '.join(devices_here())}")


def from_flags(args, gpu_precision="fp16", device=None, seed=0, shapes_world=None):
    """The backbone that add_backbone_flags' flags ask for (device: train.py's rank's own), in --precision.
    A tiny family comes from `shapes_world`, the shapes world's loader (shapes.backbones.load), which the
    scripts that offer the world hand in: the method itself knows no world of its own."""
    device = device or args.device
    precision = args.precision or (gpu_precision if str(device).startswith("cuda") else "fp32")
    dtype = PRECISIONS[precision]
    if not is_shapes_world(args.model):
        msl = getattr(args, "max_sequence_length", None)
        return load(args.model, pretrained=args.pretrained, device=device, dtype=dtype, max_sequence_length=msl)
    if shapes_world is None:
        raise SystemExit(f"{args.model} is a shapes-world backbone, and this command takes the real families only")
    return shapes_world(args.model, args.pretrained, random_init=args.random_init, seed=seed).to(device, dtype)


# -----------------------------------------------------------------------------
# Prompts: the text kwargs of the denoiser for a list of prompts. Real families use the stock
# pipeline's own `encode_prompt` (the exact text features the models were trained with).


def encode_prompts(bb, prompts, grad=False):
    """grad=True only for pretrain.py, which trains the tiny text encoder; everywhere else it is frozen."""
    facts, device = bb.facts, bb.device
    with torch.set_grad_enabled(grad):
        if bb.pipe is None:
            out = bb.text_encoder(bb.tokenize(prompts).to(device))
            hidden, pooled = out.last_hidden_state, out.pooler_output
        elif facts["pipeline"] == "FluxPipeline":  # T5's sequence, CLIP's pooled output (and zero text ids)
            hidden, pooled, _ = bb.pipe.encode_prompt(
                prompts, device=device, max_sequence_length=facts["max_sequence_length"]
            )
        elif facts["arch"] == "mmdit":  # SD3: 77 CLIP positions, then T5's max_sequence_length (families.py)
            hidden, _, pooled, _ = bb.pipe.encode_prompt(
                prompts,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=facts["max_sequence_length"],
            )
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
    elif facts["pooled"] == "text_time":  # SDXL; its micro-conditioning time ids come from denoise()
        cond["added_cond_kwargs"] = {"text_embeds": pooled}
    return cond


def index_cond(cond, index):
    """Rows `index` of every tensor in a conditioning dict (used to build the B x B pair matrix)."""
    return {k: index_cond(v, index) if isinstance(v, dict) else v[index] for k, v in cond.items()}


def cat_conds(conds):
    """Concatenate conditioning dicts along the batch (e.g. unconditional + conditional for CFG)."""
    return {
        k: cat_conds([c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
        for k, v in conds[0].items()
    }


# -----------------------------------------------------------------------------
# Images <-> latents, one path for every family: the AutoencoderKL, then the normalisation of its config,
# x0 = (z - shift_factor) * scaling_factor (SD3: shift 0.0609, scale 1.5305; SD1.5: no shift, 0.18215),
# chosen so that the latents the denoiser sees have about zero mean and unit variance.


def latent_normalisation(vae):
    return vae.config.scaling_factor, (getattr(vae.config, "shift_factor", None) or 0.0)


def encode_images(bb, images, mode=False):
    """images (B, 3, H, W) in [-1, 1] -> latents x0: a sample of the VAE posterior (shapes/pretrain.py), or with
    mode=True its mean (deterministic: what training and its encoding cache take, and what editing starts from)."""
    if bb.vae is None:
        return images.to(bb.device, bb.dtype)
    scale, shift = latent_normalisation(bb.vae)
    with torch.no_grad():
        posterior = bb.vae.encode(images.to(bb.device, bb.vae.dtype)).latent_dist
        z = posterior.mode() if mode else posterior.sample()
    return ((z - shift) * scale).to(bb.dtype)


def decode_latents(bb, latents, grad=False):
    """latents -> images (B, 3, H, W) in [-1, 1]; grad=True: differentiable (the counting loss)."""
    if bb.vae is None:
        return latents.clamp(-1, 1)
    scale, shift = latent_normalisation(bb.vae)
    with torch.enable_grad() if grad else torch.no_grad():
        return bb.vae.decode((latents / scale + shift).to(bb.vae.dtype)).sample.clamp(-1, 1)


def latent_shape(bb, size=None):
    """(C, h, w) of the VAE's latents: FLUX's denoiser reads them packed, C x 4 numbers a token."""
    size, factor = size or bb.facts["size"], bb.facts["vae_factor"]
    return (bb.denoiser.config.in_channels // (bb.facts["pack"] or 1) ** 2, size // factor, size // factor)


# -----------------------------------------------------------------------------
# Forward process and targets. A noise level u in [0, 1] is drawn per image; both families map it
# to the denoiser's timestep in [0, 1000), the scale the soft tokens' time table is indexed by.
#   DDPM (SD1.5/SDXL):  t = floor(1000 u),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  target eps
#   flow (SD3, FLUX):   sigma = u,          x_t = (1 - sigma) x0 + sigma eps,  target v = eps - x0,
#                       timestep = 1000 sigma (SD3's convention; SoftREPA eq. 11 / AGSM eq. 38)
# FLUX-dev: sigma = u moved by its dynamic time shift (families.time_shift), as FLUX.1 was trained.


def add_noise(bb, x0, noise, u):
    """x_t and the denoiser's timesteps for clean x0 (B, ...), noise like x0, levels u (B,) in [0, 1]."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if bb.facts["prediction"] == "flow":
        sigma = u.to(x0.device, torch.float32)
        if bb.facts["dynamic_shift"]:
            s = families.time_shift(bb.facts, *x0.shape[-2:])
            sigma = s * sigma / (1 + (s - 1) * sigma)
        x_t = (1 - sigma.view(shape)) * x0.float() + sigma.view(shape) * noise.float()
        return x_t.to(x0.dtype), sigma * NUM_TRAIN_TIMESTEPS
    t = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1).to(x0.device)
    abar = bb.alphas_cumprod.to(x0.device)[t].view(shape)
    x_t = abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()
    return x_t.to(x0.dtype), t


def target(bb, x0, noise):
    """What the denoiser is trained to predict: eps (DSM) or the velocity eps - x0 (flow matching)."""
    return noise if bb.facts["prediction"] == "epsilon" else noise - x0


def denoise(bb, x_t, timesteps, cond, guidance=None):
    """One call of the stock denoiser. Hooks attached with hooks.attach act inside this call. `guidance`:
    FLUX-dev's guidance input (the sampler's cfg scale); None: the family's training value."""
    if not torch.is_tensor(timesteps) or timesteps.dim() == 0:
        timesteps = torch.full((x_t.shape[0],), float(timesteps), device=x_t.device)
    if "added_cond_kwargs" in cond:  # SDXL micro-conditioning (original size, crop top-left, target size):
        side = x_t.shape[-1] * bb.facts["vae_factor"]  # this image's size, as the stock pipeline sets them
        embeds = cond["added_cond_kwargs"]["text_embeds"]
        time_ids = torch.tensor([side, side, 0, 0, side, side], device=embeds.device, dtype=embeds.dtype)
        cond = {**cond, "added_cond_kwargs": {"text_embeds": embeds, "time_ids": time_ids.repeat(len(x_t), 1)}}
    if not bb.facts["pack"]:
        return bb.denoiser(x_t, timestep=timesteps, **cond, return_dict=False)[0]
    # FLUX: the latents (B, C, h, w) go in as h/2 x w/2 tokens of 2 x 2 latent pixels, 4C numbers each, and
    # come back the same way (FluxPipeline's _pack_latents / _unpack_latents); rotary position ids (0, row, col)
    # per image token, (0, 0, 0) per text position; sigma itself (x 1000 inside the model); dev's guidance.
    (B, C, h, w), p = x_t.shape, bb.facts["pack"]
    tokens = (
        x_t.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // p) * (w // p), C * p * p)
    )
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h // p).float(), torch.arange(w // p).float()).to(x_t)
    txt_ids = x_t.new_zeros(cond["encoder_hidden_states"].shape[1], 3)
    value = bb.facts["guidance"] if guidance is None else guidance
    guide = torch.full((B,), value, device=x_t.device) if bb.denoiser.config.guidance_embeds else None
    out = bb.denoiser(
        tokens,
        timestep=timesteps / NUM_TRAIN_TIMESTEPS,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guide,
        **cond,
        return_dict=False,
    )[0]
    return out.reshape(B, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)
