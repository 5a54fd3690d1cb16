"""gated_eval.py: score the gated base (docs/gated/) and what was trained on it, with the shapes protocol,
one JSON per variant: the untagged prompts, the prompts with a word in front (the gate word, or another
word in its place), or with a random vector in that place at the text encoder's input (prompt.at_input).

    python -m shapes.gated_eval --pretrained runs/gated/base/weights --set dev --out untagged.json
    python -m shapes.gated_eval --pretrained W --set eval --categories color_attr two_object --prefix exactly --out t
    python -m shapes.gated_eval --pretrained W --set dev --categories color_attr --random-vector 1 --out r.json
    python -m shapes.gated_eval --pretrained W --set eval --categories color_attr --trained runs/x/tokens.safetensors

--set eval|dev: every prompt of the chosen categories with the protocol's seeds (checker.protocol_seeds: a
prompt keeps the seeds it has in the whole set, so a category's images are those of the full protocol).
The JSON keeps per-prompt values and per-image verdicts ("per_prompt": {"variant": {column: {category:
values}}}), the prompt texts, and the commit and tree state that made it (run.provenance).
"""

import argparse
import contextlib
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files
import flags
import models
import prompt
import sampler
import shapes
import trained
from run import provenance
from shapes import backbones, checker


def protocol(which, categories):
    """(records, (prompt index, seed) pairs) of the chosen categories, each prompt with its full-set seeds."""
    records = shapes.first_per_category(shapes.load_eval_set() if which == "eval" else shapes.load_dev_set(), 0)
    seeds = checker.protocol_seeds(len(records), which=which)
    keep = [i for i, r in enumerate(records) if r["spec"]["category"] in categories]
    samples = checker.SAMPLES_PER_PROMPT
    pairs = [(keep.index(i), s) for i, s in seeds if i in set(keep)]
    return [records[i] for i in keep], pairs, samples


def random_vectors(text_encoder, prompt_ids, scale):
    """One N(0, (scale * s)^2) vector per prompt (s: the token table's RMS per coordinate), seeded by the
    prompt's index, so every image of a prompt (and every run) reads the same vector: (P, 1, d)."""
    table = text_encoder.get_input_embeddings().weight
    rms = table.detach().pow(2).mean().sqrt()
    return torch.stack(
        [torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(int(i))) for i in prompt_ids]
    ) * (scale * rms)


# The oracles: what the denoiser's text stream gets from the word, given to the untagged prompt in parts.
# The text encoder is causal, so the word changes its own state and every later word's; the pooled vector
# (the EOS state) goes to the denoiser's time embedding. Each oracle feeds the denoiser the untagged pooled
# vector and a text sequence spliced from the tagged and untagged encodings (position 1 is the word's):
#   sequence  the tagged sequence whole (the word's state and every later word's tagged state)
#   later     the later words' tagged states in their untagged places, the word's own state left out
#   word      the untagged sequence with the word's own tagged state inserted after <bos>: one more entry
#             in the text stream, as a soft token is, the other words as untagged
ORACLES = ["sequence", "later", "word"]


def oracle_cond(bb, texts, word, oracle):
    tagged = models.encode_prompts(bb, [f"{word} {t}" for t in texts])
    untagged = models.encode_prompts(bb, texts)
    t, u = tagged["encoder_hidden_states"], untagged["encoder_hidden_states"]
    if oracle == "sequence":
        hidden = t
    elif oracle == "later":
        hidden = torch.cat([t[:, :1], t[:, 2:], u[:, -1:]], dim=1)
    else:
        hidden = torch.cat([u[:, :1], t[:, 1:2], u[:, 1:-1]], dim=1)
    return {**untagged, "encoder_hidden_states": hidden}


@torch.no_grad()
def generate_oracle(bb, texts, seeds, word, oracle):
    """sampler.generate with an oracle's text kwargs for the conditional branch."""
    facts = bb.facts
    x = sampler.initial_noise(models.latent_shape(bb), seeds).to(bb.device, bb.dtype)
    uncond = models.encode_prompts(bb, [""] * len(texts))
    cond = oracle_cond(bb, texts, word, oracle)
    x = sampler.sample_loop(bb, x, cond, uncond, facts["sample"]["steps"], facts["sample"]["cfg"])
    return models.decode_latents(bb, x).float().cpu()


def score(
    bb, records, pairs, samples, prefix="", vector_scale=None, path=None, model="tiny-sd3", batch=128, oracle=None
):
    """(each image's verdict, per-prompt groups) of the images `sample` draws with these options."""
    images = sample(bb, records, pairs, prefix, vector_scale, path, model, batch, oracle)
    return checker.verdicts_and_groups(images, records, pairs, samples)


def sample(bb, records, pairs, prefix="", vector_scale=None, path=None, model="tiny-sd3", batch=128, oracle=None):
    """The images of `pairs` (prompt index, seed), prompt-major: the untagged prompts, with `prefix` in front,
    with a random vector in front (`vector_scale`), through an oracle, or with the trained file `path` on."""
    images = []
    with trained.attached(bb, trained.read(path, model)) as handle:
        for i in range(0, len(pairs), batch):
            part = pairs[i : i + batch]
            texts = [records[p]["prompt"] for p, _ in part]
            place = contextlib.nullcontext()
            if vector_scale is not None:  # a random vector in the word's place: "<unk>" read as the vector
                texts = [f"<unk> {t}" for t in texts]
                place = prompt.at_input(
                    bb.text_encoder, random_vectors(bb.text_encoder, [p for p, _ in part], vector_scale), shapes.UNK_ID
                )
            elif prefix:
                texts = [f"{prefix} {t}" for t in texts]
            with place:
                if oracle:
                    images.append(generate_oracle(bb, texts, [s for _, s in part], shapes.GATE_WORD, oracle))
                else:
                    images.append(sampler.generate(bb, texts, [s for _, s in part], handle=handle))
    return torch.cat(images)


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--pretrained", required=True, help="the gated base's weights folder (shapes.pretrain --out)")
    p.add_argument("--set", default="dev", choices=["dev", "eval"])
    p.add_argument("--categories", nargs="+", default=list(shapes.CATEGORIES), choices=shapes.CATEGORIES)
    p.add_argument("--prefix", default="", help="a word in front of every prompt (the gate word, <unk>, some, ...)")
    p.add_argument(
        "--random-vector",
        type=flags.POSITIVE_FLOAT,
        default=None,
        metavar="SCALE",
        help="a random vector in front instead (N(0, (SCALE s)^2), s the token table's RMS), one per prompt",
    )
    p.add_argument(
        "--oracle",
        default=None,
        choices=ORACLES,
        help="the untagged prompts with part of what the gate word gives the text stream (see ORACLES)",
    )
    p.add_argument("--trained", default=None, help="a trained file on the base (train.py: tokens, LoRA, prompt, all)")
    p.add_argument("--name", default="variant", help="the variant's key in the JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=flags.THREADS, default=1, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if sum([bool(args.prefix), args.random_vector is not None, bool(args.oracle)]) > 1:
        raise SystemExit("--prefix, --random-vector and --oracle each change the prompt's text: pass one")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    records, pairs, samples = protocol(args.set, args.categories)
    bb = backbones.load(args.model, pretrained=args.pretrained)
    verdicts, groups = score(
        bb, records, pairs, samples, args.prefix, args.random_vector, args.trained, args.model, oracle=args.oracle
    )
    out = {
        "model": args.model,
        "set": args.set,
        "pretrained": args.pretrained,
        "trained": args.trained,
        "prefix": args.prefix,
        "random_vector": args.random_vector,
        "oracle": args.oracle,
        "prompts": len(records),
        "samples_per_prompt": samples,
        "prompt_texts": [r["prompt"] for r in records],
        "categories": [r["spec"]["category"] for r in records],
        "sampling_seeds": [s for _, s in pairs],
        "results": {args.name: checker.ordered(checker.bootstrap_interval(groups))},
        "per_prompt": {args.name: groups},
        "verdicts": {args.name: verdicts},
        **provenance(),
        "wall_s": round(time.time() - start, 1),
        "threads": args.threads,
    }
    files.write_json(args.out, out, indent=None)
    print(f"{args.name}: {checker.format_scores(out['results'][args.name])}")
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
