"""
lora.py: LoRA adapters, the other way to train the same losses -- SoftREPA sec. 4 "Comparison with LoRA"
(Table 3) and appendix H (Table 11). train.py --params lora puts them where --params tokens puts soft
tokens; the step (step.py) is the same step, only the trainable numbers differ.

The comparison the paper makes. Soft tokens add m learnable *text* positions to the first L blocks: the
backbone's weights are untouched and only what the image attends to changes. LoRA instead adds a
low-rank update to the backbone's own weights, W' = W + (alpha / r) B A, with A (r x d_in), B (d_out x r)
(Hu et al., 2021). Same loss, same data, same number of trainable numbers: if the contrastive loss alone
did the work, LoRA + SoftREPA would match tokens + SoftREPA. The paper finds the tokens better (Table 3,
SD3 on COCO-val 1K, x100: ImageReward 90.89 plain, 97.72 LoRA rank 4 on blocks 1-5, 106.32 tokens; CLIP
26.26, 26.42, 26.92), i.e. that tokens and the contrastive loss work together.

Where the adapters go (the paper's layout, checked by its parameter counts). SD3's attention projections
of the first N blocks: to_q, to_k, to_v, to_out.0 on the image stream and add_q_proj, add_k_proj,
add_v_proj, to_add_out on the text stream, 8 linears of 1536 x 1536 per block. At rank 4 that is
8 * 2 * 1536 * 4 = 98k numbers per block: 0.49M for "1-5" (Table 11 says 0.4M), 0.98M for "1-10"
(0.9M) and for rank 8 on "1-5" (0.9M), 2.35M for all 24 blocks (2.3M; the last block has no
to_add_out). The UNets (not in the paper): the to_q/to_k/to_v/to_out.0 of the self- and cross-attention
of the chosen block groups, the groups that carry the tokens (families.py token_blocks).

The file. A run writes lora.safetensors in diffusers' LoRA format -- the keys of save_lora_weights
("transformer." / "unet." + the peft names) and its adapter metadata -- so the stock pipeline loads it
with pipe.load_lora_weights(path); our metadata (model, loss, steps ...) rides along in the same header.
sample.py, edit.py and eval.py take it where they take a token file (trained.read sends it
here).

AGSM on LoRA. AGSM's psi+ / psi- are two token sets, one for matched and one for mismatched pairs
(AGSM sec. 3.3), and its targets come from their EMA copies. Two adapters could play those roles, but
neither paper defines it, so --params lora takes the losses the paper ran on LoRA: softrepa and dsm.
"""

import json
import os
import tempfile
from contextlib import contextmanager

import torch

import files

ADAPTER = "alignment"  # the adapter's name inside the denoiser (peft allows several)
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MMDIT_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
UNET_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_PIPELINE = {"mmdit": "StableDiffusion3Pipeline", "unet": "StableDiffusionPipeline"}  # tiny-*: same loaders


def prefix(facts):
    """The key prefix of diffusers' LoRA files: the denoiser's name in its pipeline."""
    return "transformer" if facts["arch"] == "mmdit" else "unet"


def parse_blocks(value, facts):
    """--lora-blocks: 'all', N (MM-DiT: the first N transformer blocks, the paper's "1-5") or UNet block
    groups ('down,mid'); None: where the family's tokens go (its token_layers / token_blocks)."""
    if value is None:
        return facts["token_layers"] if facts["arch"] == "mmdit" else tuple(facts["token_blocks"])
    if value == "all":
        return "all"
    if facts["arch"] == "mmdit":
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--lora-blocks {value}: pass 'all' or the number of first transformer blocks, e.g. 5")
        return int(value)
    groups = tuple(v for v in value.split(",") if v)
    if not groups or any(g not in ("down", "mid", "up") for g in groups):
        raise SystemExit(f"--lora-blocks {value}: pass 'all' or UNet block groups from down,mid,up")
    return groups


def target_modules(denoiser, facts, blocks):
    """The full names of the linear layers that get adapters (the layout above)."""
    names = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = name.removesuffix(".base_layer")  # a layer that held an adapter before: peft's wrapper
        if facts["arch"] == "mmdit":
            parts = name.split(".")  # transformer_blocks.<i>.attn.<projection>
            if (
                parts[0] == "transformer_blocks"
                and parts[2] == "attn"
                and ".".join(parts[3:]) in MMDIT_PROJECTIONS
                and (blocks == "all" or int(parts[1]) < blocks)
            ):
                names.append(name)
        else:  # <group>_blocks.<i>.attentions.<j>...attn1|attn2.<projection>
            group = name.split(".")[0].replace("_blocks", "").replace("_block", "")
            if (
                (".attn1." in name or ".attn2." in name)
                and name.split(".attn")[1][2:] in UNET_PROJECTIONS
                and (blocks == "all" or group in blocks)
            ):
                names.append(name)
    if not names:
        raise SystemExit(f"--lora-blocks {blocks}: no attention projection of this {facts['arch']} denoiser is there")
    return names


class LoraParams:
    """The adapters' trainable numbers, with the interface train.py uses for soft tokens: trainable(),
    parameters(), state_dict() / load_state_dict() (checkpoints), and the config that saves them."""

    def __init__(self, denoiser, config):
        self.denoiser, self.config = denoiser, config
        self.named = {n: p for n, p in denoiser.named_parameters() if ".lora_" in n and f".{ADAPTER}." in n}

    def trainable(self):
        return list(self.named.values())

    def parameters(self):
        return iter(self.named.values())

    def numel(self):
        return sum(p.numel() for p in self.named.values())

    def state_dict(self):
        return {n: p.detach() for n, p in self.named.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(state[n])


def add(bb, rank, blocks, alpha=None, seed=0):
    """Adapters of rank r on the chosen blocks of the frozen denoiser, through diffusers' adapter API
    (peft). B starts at zero (both peft inits), so the adapted model starts as the stock one -- as the
    soft tokens do not: they are on from step 0. alpha = r (scale 1), as diffusers' LoRA scripts set it."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        init_lora_weights="gaussian",
        target_modules=target_modules(bb.denoiser, bb.facts, blocks),
    )
    torch.manual_seed(seed)  # A's gaussian draw: the run's seed decides it, as for the tokens
    bb.denoiser.add_adapter(config, adapter_name=ADAPTER)
    params = LoraParams(bb.denoiser, config)
    for p in params.parameters():  # adapters in fp32 on a bf16 / fp16 backbone, as the tokens are
        p.data = p.data.float()
    return params


class LoraHandle:
    """What trained.attached hands out for a LoRA file: the hooks' interface, so that sampling,
    editing and the protocol run unchanged. rows(choice) picks the adapter per row: -1 is the plain
    model (the base weights), any set index the adapted one; remove() takes the adapter off again."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    @contextmanager
    def rows(self, choice):
        if choice is None or bool((torch.as_tensor(choice) >= 0).all()):
            yield self  # every row adapted: the ordinary forward
            return
        # peft's mixed-batch forward: each LoRA layer takes adapter_names, one per row of its input
        names = [ADAPTER if int(c) >= 0 else BASE for c in torch.as_tensor(choice).tolist()]
        from peft.tuners.lora import LoraLayer

        hooks = [
            m.register_forward_pre_hook(lambda m, a, k: (a, {**k, "adapter_names": names}), with_kwargs=True)
            for m in self.denoiser.modules()
            if isinstance(m, LoraLayer)
        ]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def remove(self):
        self.denoiser.delete_adapters(ADAPTER)


# -----------------------------------------------------------------------------
# Files: diffusers' LoRA format, our metadata beside its own in the safetensors header


def save(path, params, facts, **meta):
    """lora.safetensors as the stock pipeline's save_lora_weights writes it (then pipe.load_lora_weights
    reads it), with `meta` (JSON values) added to its header. Atomic, as the token files are."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    state = {
        k: v.detach().float().cpu().contiguous()
        for k, v in get_peft_model_state_dict(params.denoiser, adapter_name=ADAPTER).items()
    }
    pipeline = getattr(diffusers, facts["pipeline"] or DEFAULT_PIPELINE[facts["arch"]])
    config = {
        k: (sorted(v) if isinstance(v, set) else v)
        for k, v in params.config.to_dict().items()
        if k in ("r", "lora_alpha", "target_modules", "init_lora_weights", "lora_dropout", "use_dora")
    }
    files.write(path, lambda tmp: write_lora_file(tmp, pipeline, facts, state, config, meta))


def write_lora_file(path, pipeline, facts, state, config, meta):
    """What lora.save writes, to `path` (files.write's temporary file): the stock pipeline's file, in a
    scratch folder beside, and our metadata added to its header."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        pipeline.save_lora_weights(
            tmp,
            weight_name="lora.safetensors",
            **{f"{prefix(facts)}_lora_layers": state, f"{prefix(facts)}_lora_adapter_metadata": config},
        )
        written = os.path.join(tmp, "lora.safetensors")
        with safe_open(written, framework="pt") as f:
            header = dict(f.metadata() or {})
        header.update(
            {
                k: json.dumps(v)
                for k, v in dict(meta, params="lora", rank=config["r"], alpha=config["lora_alpha"]).items()
            }
        )
        save_file(load_file(written), path, metadata=header)


def is_lora_file(path):
    """A LoRA file (ours or any diffusers LoRA): files.describe reads its keys (lora_A / lora_B)."""
    return files.describe(path)[0] == "lora"


def read(path, name, prefix_of_family):
    """(state dict, info) of a LoRA file for family `name`: one-line errors for a file of another family or
    non-finite numbers."""
    header, state = files.read_safetensors(path, "a LoRA file (lora.safetensors of train.py --params lora)")
    try:
        model = json.loads(header["model"]) if "model" in header else None
    except ValueError:
        raise SystemExit(f"{path}: its 'model' metadata is not JSON; expected a LoRA file of train.py") from None
    if model not in (None, name):
        raise SystemExit(f"{path} holds LoRA adapters for {model}, not {name}: pass --model {model}")
    if not any(k.startswith(prefix_of_family + ".") for k in state):
        raise SystemExit(f"{path} holds no '{prefix_of_family}.' LoRA keys: it is not a LoRA of {name}'s denoiser")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(
            f"{path} holds non-finite numbers (NaN or inf) in {bad[0]}: it comes from a diverged run; "
            f"retrain with a lower --lr"
        )
    return state, dict(token_set="lora", blocks=None, path=path)


def attach(bb, state):
    """The adapters of a LoRA file on bb's denoiser, loaded by diffusers' own loader (the one behind
    pipe.load_lora_weights); returns a LoraHandle."""
    if ADAPTER in (getattr(bb.denoiser, "peft_config", None) or {}):
        bb.denoiser.delete_adapters(ADAPTER)  # one LoRA at a time
    try:
        bb.denoiser.load_lora_adapter(dict(state), prefix=prefix(bb.facts), adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"cannot load this LoRA into {bb.name}: {str(e).splitlines()[0]}") from None
    for module in bb.denoiser.modules():  # the adapter in the backbone's device and dtype
        module.to(bb.device)
    return LoraHandle(bb.denoiser)
