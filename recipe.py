"""
recipe.py: every setting of a training run, declared once.

One entry per setting (flags.Setting): its name, its domain, its default -- a value, or the rule that gives it
per family and loss (the papers' Table 5 of SoftREPA and Table 11 of AGSM, and the authors' codes where the
papers are silent: docs/choices.md) --, its help, and what a resumed run does with it. Everything else is
derived from this list:
    train.py's command line          add_flags
    the defaults of a run            resolve (and `defaults`, what bench.py and the tests take)
    the resume check                 run.resume_config walks the KEEP and CHANGE settings
    the refusal of a flag a run does not use (--n-tokens with --params lora): Setting.applies, in resolve
Adding a setting is one entry here plus the code that reads it (args.<name>). The losses are declared in
losses.LOSSES; the families' facts in families.FAMILIES.
"""

import argparse

import flags
from families import FAMILIES
from flags import CHANGE, FREE, KEEP, SWITCH, Setting
from losses import DEFAULT_LOSS, LOSSES


def _recipe(facts, args):
    """The entry of the family's facts that holds the paper's batch and steps for this loss."""
    return facts[LOSSES[args.loss]["recipe"]]


def _tokens(args):
    return args.params == "tokens"


def _loss(*names):
    return lambda args: args.loss in names


# The schedule rule for runs of any length: the authors step CosineAnnealingWarmRestarts(T_0=10) once every
# `period` iterations, and their runs hold paper_steps / period such periods (SoftREPA 60, AGSM 100). Keeping
# that number fixed, period = steps * paper_period / paper_steps, gives a run of any length the same shape of
# schedule: 6 (SoftREPA) or 10 (AGSM) cosine cycles, constant within each period (train.lr_at_step).
def _lr_period(facts, args):
    paper_steps, paper_period = LOSSES[args.loss]["paper_run"]
    return max(1, round(args.steps * paper_period / paper_steps))


SETTINGS = [
    # ---- what is trained, on what: the backbone (flags declared by models.add_backbone_flags), the loss, the data
    Setting("model", str, "tiny-sd3", "the backbone family (models.add_backbone_flags)", KEEP, flag=False),
    Setting(
        "pretrained",
        str,
        None,
        "a local folder of the backbone (models.add_backbone_flags); a resumed run may take a moved copy",
        CHANGE,
        flag=False,
        rule="the hub, or shapes/weights/ for tiny-*",
    ),
    Setting("random_init", SWITCH, False, "tiny-*: random weights (models.add_backbone_flags)", KEEP, flag=False),
    Setting(
        "precision",
        ["fp32", "bf16", "fp16"],
        lambda facts, args: "bf16" if str(args.device).startswith("cuda") else "fp32",
        "the backbone's dtype (models.add_backbone_flags); a diverged run may go on in fp32",
        CHANGE,
        flag=False,
        rule="bf16 on CUDA (the authors' fp16 needs a gradient scaler, which --precision fp16 gets), fp32 on the CPU",
    ),
    Setting("device", str, None, "where this rank runs (models.add_backbone_flags)", FREE, flag=False),
    Setting("threads", flags.THREADS, 0, "torch CPU threads (models.add_backbone_flags)", FREE, flag=False),
    Setting(
        "max_sequence_length",
        str,
        lambda facts, args: facts["max_sequence_length"],
        "T5 positions of the text stream (models.add_backbone_flags)",
        KEEP,
        flag=False,
    ),
    Setting("world", int, None, "the number of ranks (torchrun)", KEEP, flag=False),
    Setting("loss", list(LOSSES), DEFAULT_LOSS, "the training loss (losses.LOSSES)", KEEP),
    Setting(
        "data",
        str,
        lambda facts, args: "shapes" if facts["hub"] is None else None,
        "'shapes' (tiny-*; 'shapes:CAT,..' or 'shapes-swapped:CAT,..' for the capacity control), a COCO folder, "
        "captions_*.json, .jsonl, a folder of images + .txt, or an encoding cache (python data.py cache)",
        KEEP,
        rule="shapes on tiny-*, required otherwise",
    ),
    Setting(
        "val_data", str, None, "held-out pairs for classifier.classifier_accuracy (real models)", FREE, metavar="PATH"
    ),
    # ---- the schedule and the optimizer: AdamW on the trained numbers only, lr 1e-3, wd 1e-4 (SoftREPA Table 5,
    # AGSM Table 11 and both codes)
    Setting(
        "steps",
        flags.POSITIVE_INT,
        lambda facts, args: _recipe(facts, args)["steps"],
        "optimizer steps (a resumed run may extend them)",
        CHANGE,
        rule="the paper's for the family and loss",
    ),
    Setting(
        "batch",
        flags.POSITIVE_INT,
        lambda facts, args: _recipe(facts, args)["batch"],
        "images per rank; the pair matrix is batch x batch",
        KEEP,
        rule="the paper's",
    ),
    Setting(
        "size",
        flags.POSITIVE_INT,
        lambda facts, args: facts["train_size"],
        "training image size",
        KEEP,
        rule="the family's train_size: 512 for every real family, as both codes train",
    ),
    Setting("seed", flags.SEED, 0, "a seed in [0, 2^63)", KEEP),
    Setting("lr", flags.POSITIVE_FLOAT, 1e-3, "learning rate (both papers)", CHANGE),
    Setting("wd", flags.NON_NEGATIVE_FLOAT, 1e-4, "AdamW weight decay (both papers); 0: none", KEEP),
    Setting(
        "min_lr", flags.NON_NEGATIVE_FLOAT, 1e-5, "the cosine's floor (the released codes); 0: it falls to 0", KEEP
    ),
    Setting(
        "lr_period",
        flags.POSITIVE_INT,
        _lr_period,
        "steps per scheduler step",
        KEEP,
        rule="the authors' period scaled to --steps (train.lr_at_step)",
    ),
    Setting("grad_clip", flags.NON_NEGATIVE_FLOAT, 0.0, "max gradient norm; 0: off", KEEP),
    # ---- what trains: soft tokens (softtokens.py, placed by hooks.py) or LoRA adapters (lora.py)
    Setting(
        "params",
        ["tokens", "lora", "prompt", "all"],
        "tokens",
        "what is trained: soft tokens; LoRA adapters of the denoiser (SoftREPA Table 3, app. H); a prompt at the "
        "text encoder's input (textual inversion's place, prompt.py); or the whole denoiser (whole.py)",
        KEEP,
    ),
    Setting(
        "n_tokens",
        flags.POSITIVE_INT,
        lambda facts, args: facts["n_tokens"],
        "soft tokens per layer",
        KEEP,
        applies=_tokens,
        rule="the family's",
    ),
    Setting(
        "layers",
        flags.POSITIVE_INT,
        lambda facts, args: facts["token_layers"],
        "token layers (MM-DiT blocks with tokens)",
        KEEP,
        applies=_tokens,
        rule="the family's",
    ),
    Setting(
        "blocks",
        str,
        lambda facts, args: ",".join(facts["token_blocks"] or ()),
        "UNet block groups with tokens, e.g. down,mid",
        KEEP,
        applies=_tokens,
        rule="the family's",
    ),
    Setting(
        "time_table",
        ["on", "off"],
        lambda facts, args: "on" if facts["time_table"] else "off",
        "time-dependent tokens (SoftREPA eq. 12)",
        KEEP,
        applies=_tokens,
        rule="the family's",
    ),
    Setting(
        "init",
        ["normal", "uncond"],
        lambda facts, args: facts["init"],
        "tokens from N(0, 0.02) or from the empty prompt's BOS state (SD1.5)",
        KEEP,
        applies=_tokens,
        rule="the family's",
    ),
    Setting(
        "lora_rank",
        flags.POSITIVE_INT,
        4,
        "LoRA rank (SoftREPA Table 11's best)",
        KEEP,
        applies=lambda args: args.params == "lora",
    ),
    Setting(
        "lora_blocks",
        str,
        lambda facts, args: (
            str(facts["token_layers"]) if facts["arch"] == "mmdit" else ",".join(facts["token_blocks"])
        ),
        "LoRA on 'all', the first N MM-DiT blocks, or UNet groups down,mid,up",
        KEEP,
        applies=lambda args: args.params == "lora",
        rule="where the family's tokens go",
    ),
    Setting(
        "prompt_vectors",
        flags.POSITIVE_INT,
        1,
        "--params prompt: learned vectors after <bos>",
        KEEP,
        applies=lambda args: args.params == "prompt",
    ),
    Setting(
        "prompt_init",
        str,
        "a",
        "--params prompt: the word whose embedding the vectors start from",
        KEEP,
        applies=lambda args: args.params == "prompt",
    ),
    # ---- the losses' settings (losses.py)
    Setting("noise_per_row", SWITCH, False, "one t and eps per image row instead of one per step (the codes)", KEEP),
    Setting("paper_tau", SWITCH, False, "tau = 1/(C*H*W): the plain sum of AGSM Alg. 1 line 8", KEEP),
    Setting(
        "tau",
        flags.POSITIVE_FLOAT,
        lambda facts, args: 1.0 if args.paper_tau else LOSSES[args.loss]["tau"],
        "temperature of the error softmax",
        KEEP,
        rule="the loss's: softrepa 0.07, agsm 0.1 (the authors' codes)",
    ),
    Setting("scale", flags.POSITIVE_FLOAT, 4.0, "SoftREPA's logit scale", KEEP, applies=_loss("softrepa")),
    Setting(
        "dweight",
        flags.NON_NEGATIVE_FLOAT,
        lambda facts, args: facts["softrepa"]["dweight"],
        "SoftREPA: weight of the DSM term; 0: none",
        KEEP,
        applies=_loss("softrepa"),
        rule="the family's (SoftREPA app. B)",
    ),
    Setting(
        "gamma_pos",
        flags.NON_NEGATIVE_FLOAT,
        lambda facts, args: facts["agsm"]["gamma_pos"],
        "AGSM gamma+ (0: matched pairs regress onto plain eps)",
        KEEP,
        applies=_loss("agsm"),
        rule="the family's (AGSM Table 11)",
    ),
    Setting(
        "gamma_neg",
        flags.NON_NEGATIVE_FLOAT,
        lambda facts, args: facts["agsm"]["gamma_neg"],
        "AGSM gamma- (0: mismatched pairs regress onto plain eps)",
        KEEP,
        applies=_loss("agsm"),
        rule="the family's (AGSM Table 11)",
    ),
    Setting("bradley_terry", SWITCH, False, "AGSM Table 7's pairwise choices", KEEP, applies=_loss("agsm")),
    Setting(
        "plain_sum",
        SWITCH,
        False,
        "AGSM: one plain sum over all pairs (Alg. 1 line 12) instead of the code's two means",
        KEEP,
        applies=_loss("agsm"),
    ),
    # The EMA rule: the AGSM code's decay 0.9999 per step over 100k steps averages over the last
    # 1 / (1 - 0.9999) = 10^4 steps, a tenth of the run; 1 - 10 / steps keeps that fraction.
    Setting(
        "ema_decay",
        flags.PROBABILITY,
        lambda facts, args: max(0.0, 1 - 10 / args.steps),
        "AGSM's EMA tokens (0: the current tokens, 1: they stay at their start)",
        KEEP,
        applies=_loss("agsm"),
        rule="1 - 10/steps: the code's 0.9999 at 100k steps, its horizon a tenth of any run",
    ),
    Setting(
        "ema_init",
        ["draw", "copy"],
        lambda facts, args: "copy" if facts["hub"] is None else "draw",
        "AGSM's EMA tokens start as their own draw (the AGSM code builds them separately) or as a copy of psi+-",
        KEEP,
        applies=_loss("agsm"),
        rule="draw on the real families (the AGSM code), copy on tiny-* (ours)",
    ),
    Setting(
        "gather_text",
        SWITCH,
        False,
        "all ranks' captions as negatives (pair matrix B x world*B; SoftREPA's code)",
        KEEP,
        applies=lambda args: LOSSES[args.loss]["pairs"] == "matrix",
    ),
    Setting(
        "distill_prefix",
        str,
        None,
        "dsm: regress onto the frozen model's own prediction for WORD + the caption (nothing trained attached) "
        "instead of the data's target: can the trained numbers express what WORD does (docs/gated/)",
        KEEP,
        applies=lambda args: args.loss == "dsm" and args.params != "all",
        metavar="WORD",
    ),
    Setting(
        "count_weight", flags.NON_NEGATIVE_FLOAT, 0.0, "weight of the counting loss (SoftREPA app. D); 0: off", KEEP
    ),
    Setting(
        "counter",
        str,
        None,
        "its counter: a transformers object-detector folder (tiny-*: shapes/weights/counter.safetensors)",
        KEEP,
        metavar="PATH",
    ),
    # ---- machinery: how a step is computed and logged, not which step it is
    Setting(
        "rows_per_forward",
        flags.POSITIVE_INT,
        0,
        "image rows of the pair matrix per forward and backward (the authors' --nrows); the step is the same",
        FREE,
        rule="all rows",
        metavar="N",
    ),
    Setting("grad_checkpointing", SWITCH, False, "recompute the frozen backbone in backward", FREE),
    Setting("compile", SWITCH, False, "torch.compile the denoiser", FREE),
    Setting("workers", flags.POSITIVE_INT, 4, "image-decoding threads", FREE),
    Setting("ckpt_every", flags.POSITIVE_INT, 1000, "a checkpoint every N steps", FREE),
    Setting("val_every", flags.NON_NEGATIVE_INT, 0, "validate every N steps (0: never)", FREE),
    Setting("val_n", flags.POSITIVE_INT, 8, "tiny-*: eval prompts per shapes category", FREE),
    Setting("val_steps", flags.POSITIVE_INT, None, "validation sampling steps", FREE, rule="the family's"),
    Setting("log_every", flags.POSITIVE_INT, 10, "a stdout line every N steps (the CSV gets every step)", FREE),
]
BY_NAME = {s.name: s for s in SETTINGS}
RESUMED = [s.name for s in SETTINGS if s.resume in (KEEP, CHANGE)]  # what a resumed run takes from its checkpoint


def add_flags(parser):
    for setting in SETTINGS:
        if setting.flag:
            setting.add_to(parser)


def given(args):
    """The settings given on the command line (before a checkpoint or a default fills the rest)."""
    return {s.name for s in SETTINGS if getattr(args, s.name, None) is not None}


def resolve(args, given=()):
    """Fill every unset setting with its default, in the order they are declared (a rule reads the settings
    above it); then refuse what trains against the loss (AGSM's two token sets on one set of weights), and a
    flag in `given` that this run does not use."""
    facts = FAMILIES[args.model or BY_NAME["model"].default]
    for setting in SETTINGS:
        if getattr(args, setting.name, None) is None:
            setattr(args, setting.name, setting.value_for(facts, args))
        if setting.domain is SWITCH:
            setattr(args, setting.name, bool(getattr(args, setting.name)))
    if LOSSES[args.loss]["token_sets"] == "pair" and args.params != "tokens":  # the root cause comes first
        raise SystemExit(
            f"--params {args.params} trains one set of weights, and --loss {args.loss} trains two token sets "
            f"(psi+ and psi-), which no paper defines on adapters: pass --loss softrepa or dsm, or --params tokens"
        )
    for setting in SETTINGS:
        if setting.name in given and setting.applies is not None and not setting.applies(args):
            raise SystemExit(
                f"{setting.option} does nothing in this run (--loss {args.loss}, --params {args.params}): drop it"
            )
    return args


def defaults(model, loss=DEFAULT_LOSS, **settings):
    """The resolved recipe of family `model` and `loss`, with `settings` given (e.g. steps=100): a dict of
    every setting. What bench.py times and the tests train."""
    args = argparse.Namespace(**{s.name: None for s in SETTINGS})
    vars(args).update(settings, model=model, loss=loss, world=1)
    return vars(resolve(args))
