"""
eval.py: the papers' evaluation on folders of images written by sample.py / edit.py, one table.

    python eval.py --runs runs/base runs/softrepa-seed0 runs/softrepa-seed1 --plot
    python eval.py --runs out/sd3 --metrics clip pickscore imagereward hps fid lpips --ref coco/val5k
    python eval.py --runs out/pnp --metrics edit imagereward pickscore hps --pie PIE-Bench_v1
    python eval.py --to-geneval out/sd3 --geneval-prompts geneval/prompts/evaluation_metadata.jsonl
    python eval.py --protocol dev --model tiny-sd3 --tokens runs/agsm/tokens.safetensors   # shapes world

What is measured (SoftREPA Tables 1-2, AGSM Tables 1-2, Figures 4-5):
  shapes        the shapes world's exact GenEval-style checker (shapes.score) per category, offline
  classifier    held-out diffusion-classifier accuracy of the backbone + the run's tokens (--model):
                the true caption must have the lowest denoising error among K (SoftREPA eqs. 15-18)
  geneval       GenEval per category, read back from its own scorer's results jsonl
  clip          CLIP score, 100 * max(cos, 0), ViT-L/14 (torchmetrics' CLIPScore definition)
  pickscore     PickScore_v1 (CLIP-H), logit_scale * cos
  imagereward   ImageReward-v1.0;  hps: HPSv2.1
  fid, lpips    FID against --ref (Inception pool3, pytorch-fid's weights, the papers' ref. [34]);
                LPIPS of each image against the --ref image of the same file name (the papers do
                not say what their COCO LPIPS compares with; this pairing is our reading)
  edit          PIE-Bench (--pie): CLIP edited region / whole, background PSNR / LPIPS / SSIM outside
                the edit mask and DINO structure distance, as PIE-Bench's own evaluate.py computes them
Heavy metric models are optional (pip install -r requirements-eval.txt); they load from the Hugging
Face hub, or only from --weights DIR when it is given: DIR/<hub id, or its last part> for the CLIP
models and DINO (HUB below), DIR/HPS_v2.1_compressed.pt, DIR/ImageReward.pt + med_config.json, and
torchvision / pytorch-fid files in DIR/checkpoints/. A metric that cannot load is skipped with one line.
FID's Frechet distance, PSNR and SSIM are written out here.

--protocol dev|eval is the shapes world's evaluation with statistical power (shapes.py): it samples every
prompt of data/shapes_{dev,eval}.jsonl with 4 seeds fixed by rule, with the plain model and with each
--tokens file, and prints each category, the mean and the over-counting rates with 95% bootstrap
intervals over prompts, plus a grid of the first prompt of each category, plain | tokens, same seeds.
Choose anything on the dev set; the eval set is for the final measurement.

Rows of the table: one per run folder and sample.py "variant" (--compare writes "plain" and "tokens"
into one folder). +- is the sample std over seeds: the distinct record seeds inside a folder
(sample.py --seed 0 1 2), and folders whose names differ only by a "-seedN" suffix share one row.
The table shows ImageReward, HPS, LPIPS and SSIM x100 and structure distance x1000, as the papers do;
the JSON (--json) holds the raw values. Values are cached per folder in eval_metrics.json.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
import shapes

GEN_METRICS = ["clip", "pickscore", "imagereward", "hps", "fid", "lpips"]
ALL_METRICS = ["shapes", "classifier", "geneval", "edit"] + GEN_METRICS
HUB = dict(clip="openai/clip-vit-large-patch14", pickscore="yuvalkirstain/PickScore_v1",
           pick_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", dino="facebook/dino-vitb8",
           hps=("xswu/HPSv2", "HPS_v2.1_compressed.pt"), imagereward="ImageReward-v1.0")
DISPLAY_SCALE = {"imagereward": 100, "hps": 100, "lpips": 100, "bg_lpips": 100, "bg_ssim": 100,
                 "structure_distance": 1000}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -----------------------------------------------------------------------------
# Run folders

def read_records(run):
    """sample.py's records.jsonl: one {"image", "prompt", "seed", "variant", "spec", "tokens", ...} per image."""
    path = os.path.join(run, "records.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    for n, record in data.json_lines(path, "a record written by sample.py"):
        if "image" not in record:
            raise SystemExit(f"{path}:{n}: a record needs an \"image\" path (written by sample.py)")
        records.append(record)
    return records


def load_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:   # PIL's ways to fail: missing, truncated, not an image
        raise SystemExit(f"cannot read the image {path} ({e.strerror or type(e).__name__ if isinstance(e, OSError) else type(e).__name__})"
                         f": re-sample it, or drop its line from records.jsonl") from None


def to_pil(image):
    from PIL import Image
    return Image.fromarray(image)


def list_images(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXT))


# -----------------------------------------------------------------------------
# Written out: Frechet distance, PSNR, SSIM, PIE-Bench's mask RLE

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).
    S1 S2 is not symmetric, but it is similar to M = S1^(1/2) S2 S1^(1/2) (symmetric PSD), so
    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)): two eigh calls, no complex sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    cross = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def fid_from_features(a, b):
    """FID between two feature sets (N, D): Gaussians with the sample mean and covariance (ddof 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def psnr(x, y, data_range=1.0):
    """10 log10(range^2 / MSE) over all pixels (torchmetrics' PeakSignalNoiseRatio, as PIE-Bench)."""
    mse = float(((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x, y, data_range=1.0, window=11, sigma=1.5):
    """SSIM of two (H, W, C) images: Gaussian 11x11 (sigma 1.5) local statistics, mean over the windows
    that fit in the image and over channels (torchmetrics' StructuralSimilarityIndexMeasure):
    SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))."""
    t = lambda a: torch.as_tensor(np.asarray(a, np.float64)).permute(2, 0, 1).unsqueeze(1)  # noqa: E731
    x, y = t(x), t(y)                                                           # (C, 1, H, W)
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).view(1, 1, window, window)
    blur = lambda a: F.conv2d(a, kernel)  # noqa: E731  valid windows only
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def mask_decode(rle, shape=(512, 512)):
    """PIE-Bench's mask: (start, length) pairs over the flattened image, 1 = edited region. Like its
    evaluate.py, the one-pixel border counts as edited ("to avoid annotation errors in boundary")."""
    mask = np.zeros(shape[0] * shape[1], np.float32)
    for start, length in zip(rle[0::2], rle[1::2]):
        mask[start:start + length] = 1
    mask = mask.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


# -----------------------------------------------------------------------------
# Metric models. Each loader returns the scorer, or None after one line saying why it is skipped.
# CLIP score and PickScore are both CLIP models: scored here with transformers (one code path for
# both, and testable with tiny local models). HPSv2.1 is an open_clip ViT-H-14 with the HPS weights:
# the hpsv2 package pins pytest==7.2.0 and protobuf<4 (it would downgrade this project's test
# runner) and first downloads the 4 GB LAION weights that the HPS checkpoint then overwrites, so its
# ten-line score() is repeated on open_clip. ImageReward (BLIP) and LPIPS use their packages;
# Inception uses pytorch-fid, the code the papers cite for FID.

def skip(metric, why):
    print(f"{metric}: skipped ({why})")


def source(hub_id, weights):
    """A hub id, or with --weights DIR only DIR/<hub id> or DIR/<its last part> (None if absent)."""
    if weights is None:
        return hub_id
    for path in (os.path.join(weights, hub_id), os.path.join(weights, hub_id.split("/")[-1])):
        if os.path.exists(path):
            return path
    return None


def load_clip(metric, model_id, weights=None, processor_id=None, device="cpu"):
    """(CLIPModel, CLIPProcessor) from the hub or a local folder, or None."""
    from transformers import CLIPModel, CLIPProcessor
    model_src, proc_src = source(model_id, weights), source(processor_id or model_id, weights)
    if model_src is None or proc_src is None:
        return skip(metric, f"--weights {weights} holds no {model_id if model_src is None else processor_id}")
    try:
        model = CLIPModel.from_pretrained(model_src).to(device).eval()
        return model, CLIPProcessor.from_pretrained(proc_src)
    except (OSError, ValueError) as e:
        return skip(metric, f"cannot load {model_src}: {type(e).__name__}; offline, pass --weights DIR")


@torch.no_grad()
def clip_cosines(clip, images, prompts, batch=32):
    """cos(image_i, prompt_i) of a CLIP model for uint8 (H, W, 3) images; and the model's logit scale."""
    model, processor = clip
    device, out = next(model.parameters()).device, []
    max_len = model.config.text_config.max_position_embeddings
    for i in range(0, len(images), batch):
        inputs = processor(text=list(prompts[i:i + batch]), images=[to_pil(im) for im in images[i:i + batch]],
                           return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        o = model(**{k: v.to(device) for k, v in inputs.items()})
        out.append((o.image_embeds * o.text_embeds).sum(-1).float().cpu())   # both are L2-normalised
    return torch.cat(out), float(model.logit_scale.detach().exp())


def clip_score(clip, images, prompts):
    cos, _ = clip_cosines(clip, images, prompts)
    return (100 * cos.clamp(min=0)).tolist()


def pick_score(pick, images, prompts):
    cos, scale = clip_cosines(pick, images, prompts)
    return (scale * cos).tolist()


def load_hps(weights=None, device="cpu"):
    try:
        import open_clip
    except ImportError:
        return skip("hps", "missing package open-clip-torch: pip install -r requirements-eval.txt")
    repo, filename = HUB["hps"]
    try:
        if weights is not None:
            path = os.path.join(weights, filename)
            if not os.path.exists(path):
                return skip("hps", f"no {path}")
        else:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(repo, filename)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    except (OSError, ValueError) as e:
        return skip("hps", f"cannot load {repo}/{filename}: {type(e).__name__}; offline, pass --weights DIR")
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer("ViT-H-14")


@torch.no_grad()
def hps_score(hps, images, prompts, batch=16):
    """HPSv2: cosine of open_clip's normalised image and text features (hpsv2.score's diagonal)."""
    model, preprocess, tokenizer = hps
    device, out = next(model.parameters()).device, []
    for i in range(0, len(images), batch):
        pixels = torch.stack([preprocess(to_pil(im)) for im in images[i:i + batch]]).to(device)
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(list(prompts[i:i + batch])).to(device), normalize=True)
        out += (image_features * text_features).sum(-1).float().cpu().tolist()
    return out


def load_imagereward(weights=None, device="cpu"):
    try:
        import ImageReward
    except ImportError as e:
        return skip("imagereward", f"cannot import image-reward ({e}); see requirements-eval.txt")
    try:
        if weights is None:
            return ImageReward.load(HUB["imagereward"], device=device)
        path, config = os.path.join(weights, "ImageReward.pt"), os.path.join(weights, "med_config.json")
        if not (os.path.exists(path) and os.path.exists(config)):
            return skip("imagereward", f"--weights {weights} holds no ImageReward.pt + med_config.json")
        return ImageReward.load(path, device=device, med_config=config)
    except (OSError, ValueError, RuntimeError) as e:
        return skip("imagereward", f"cannot load {HUB['imagereward']}: {type(e).__name__}")


@torch.no_grad()
def imagereward_score(model, images, prompts):
    return [float(model.score(p, to_pil(im))) for im, p in zip(images, prompts)]


def hub_checkpoint(weights, prefix):
    """torchvision / pytorch-fid download into <torch hub dir>/checkpoints/: with --weights DIR that dir
    is DIR, and the file must already be there (no download)."""
    if weights is None:
        return True
    torch.hub.set_dir(weights)
    return bool(glob.glob(os.path.join(weights, "checkpoints", prefix + "*")))


def load_inception(weights=None, device="cpu"):
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        return skip("fid", "missing package pytorch-fid: pip install -r requirements-eval.txt")
    if not hub_checkpoint(weights, "pt_inception-2015-12-05"):
        return skip("fid", f"no {weights}/checkpoints/pt_inception-2015-12-05-6726825d.pth")
    try:   # the 2048-d pool3 features of the TF-ported FID Inception (pt_inception-2015-12-05)
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        return skip("fid", f"cannot load the FID Inception weights: {type(e).__name__}; offline, put "
                           f"pt_inception-2015-12-05-6726825d.pth in --weights DIR/checkpoints/")


@torch.no_grad()
def inception_features(model, paths, batch=50):
    device, out = next(model.parameters()).device, []
    for i in tqdm(range(0, len(paths), batch), desc="inception", leave=False):
        x = torch.stack([torch.from_numpy(load_image(p).copy()).permute(2, 0, 1) for p in paths[i:i + batch]])
        out.append(model(x.float().div(255).to(device))[0].flatten(1).cpu())   # in [0, 1]; resized inside
    return torch.cat(out).numpy()


def load_lpips(net="alex", weights=None, device="cpu", random_backbone=False):
    """LPIPS (lpips package: linear heads ship in the wheel, the backbone comes from torchvision).
    PIE-Bench uses net="squeeze"; random_backbone=True builds it without a download (tests)."""
    try:
        import lpips
    except ImportError:
        return skip("lpips", "missing package lpips: pip install -r requirements-eval.txt")
    backbone = {"alex": "alexnet", "squeeze": "squeezenet1_1", "vgg": "vgg16"}[net]
    if not random_backbone and not hub_checkpoint(weights, backbone):
        return skip("lpips", f"no torchvision {backbone} weights in {weights}/checkpoints/")
    try:
        return lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        return skip("lpips", f"cannot load the {net} backbone: {type(e).__name__}; offline, put torchvision's "
                             f"{net} weights in --weights DIR/checkpoints/")


@torch.no_grad()
def lpips_distance(model, x, y):
    """LPIPS of two uint8 (H, W, 3) images (inputs in [-1, 1])."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1  # noqa: E731
    device = next(model.parameters()).device
    return float(model(t(x).to(device), t(y).to(device)))


def load_dino(weights=None, device="cpu"):
    """DINO ViT-B/8 (transformers' copy of facebookresearch/dino's dino_vitb8, which PIE-Bench loads)."""
    from transformers import ViTModel
    src = source(HUB["dino"], weights)
    if src is None:
        return skip("structure_distance", f"--weights {weights} holds no {HUB['dino']}")
    try:
        return ViTModel.from_pretrained(src, add_pooling_layer=False).to(device).eval()
    except (OSError, ValueError) as e:
        return skip("structure_distance", f"cannot load {src}: {type(e).__name__}; offline, pass --weights DIR")


@torch.no_grad()
def dino_key_self_similarity(model, image):
    """Cosine self-similarity (T, T) of the last block's attention keys, heads concatenated (Splice /
    PIE-Bench's get_keys_self_sim_from_input at layer 11). Like PIE-Bench's evaluate.py, pixels stay
    in [0, 255] before the ImageNet normalisation (it never divides by 255); kept for comparable numbers."""
    keys = [m for n, m in model.named_modules() if n.endswith(("k_proj", "attention.key"))][-1]
    seen = []
    hook = keys.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None]
    size = model.config.image_size
    scale = size / min(x.shape[-2:])                                  # shorter side -> 224, like Resize(224)
    x = F.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)), mode="bilinear",
                      antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    try:
        model(pixel_values=((x - mean) / std).to(next(model.parameters()).device), interpolate_pos_encoding=True)
    finally:
        hook.remove()
    k = F.normalize(seen[-1][0].float(), dim=-1)
    return k @ k.T


def structure_distance(model, x, y):
    """MSE between the DINO key self-similarity matrices of two images (PIE-Bench "structure distance")."""
    return float(F.mse_loss(dino_key_self_similarity(model, x), dino_key_self_similarity(model, y)))


# -----------------------------------------------------------------------------
# GenEval: its folder layout out, its results back

def write_geneval(images_by_prompt, metadata, outdir):
    """<outdir>/<00000>/metadata.jsonl (the prompt's line of evaluation_metadata.jsonl) and
    samples/<0000>.png, so GenEval's evaluation/evaluate_images.py runs on it unchanged."""
    for n, meta in enumerate(metadata):
        paths = images_by_prompt.get(meta["prompt"], [])
        if not paths:
            raise SystemExit(f"no image for GenEval prompt {n} {meta['prompt']!r}: sample every prompt of "
                             f"the metadata file first")
        folder = os.path.join(outdir, f"{n:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(meta) + "\n")
        for k, path in enumerate(paths):
            target = os.path.join(folder, "samples", f"{k:04d}.png")
            if path.lower().endswith(".png"):
                shutil.copyfile(path, target)
            else:
                to_pil(load_image(path)).save(target)


def read_geneval(path):
    """GenEval's results jsonl -> {geneval_<tag>: fraction correct, geneval_mean: mean over tags}
    (its summary_scores.py: the overall score averages the task scores)."""
    by_tag = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
    scores = {f"geneval_{tag}": float(np.mean(v)) for tag, v in by_tag.items()}
    scores["geneval_mean"] = float(np.mean(list(scores.values())))
    return scores


# -----------------------------------------------------------------------------
# Held-out diffusion classifier (SoftREPA eqs. 15-18). Under an optimal denoiser, log p(x|y) is, up
# to a constant, minus the weighted denoising error integrated over t (eq. 16), so the caption with
# the lowest error is the maximum-likelihood caption. We estimate the error at a few fixed noise
# levels with one fixed eps per (image, level), shared by all candidate captions of that image (like
# the papers' shared t and eps per row), so only the caption differs between candidates.

CLASSIFIER_NOISE_LEVELS = (0.25, 0.5, 0.75)
STRICT = {"single_object": "colors", "two_object": "color_attr"}   # colour-exact versions of the rules


def ground_truth_images(records, seed=0, size=32):
    """uint8 (size, size, 3) images: a shapes record (with "spec") is rendered, its layout drawn from the
    generator (seed, i); any other record's "image" file is centre-cropped and resized (real data)."""
    out = []
    for i, r in enumerate(records):
        if "spec" in r:
            out.append(shapes.render(r["spec"], size, np.random.default_rng([seed, i])))
            continue
        im = to_pil(load_image(r["image"]))
        side = min(im.size)
        im = im.crop(((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2, (im.height + side) // 2))
        out.append(np.asarray(im.resize((size, size), 3)))                  # bicubic
    return out


def distractors(records, i, image, k, rng):
    """k captions that are false of record i's image. Shapes records: hard negatives from its own category,
    sharing its template and differing in colour, shape, count or relation; a caption the image also
    satisfies (colour-exact check: "b and a" for "a and b", a second relation that also holds) is skipped.
    Other records: the prompts of k other records that are none of this image's "captions"."""
    record = records[i]
    if "spec" not in record:
        own = set(record.get("captions") or [record["prompt"]])
        pool = [records[j]["prompt"] for j in rng.permutation(len(records)) if j != i]
        texts = [t for t in dict.fromkeys(pool) if t not in own]
    else:
        specs = shapes.all_specs(record["spec"]["category"])
        strict = lambda spec: {**spec, "category": STRICT.get(spec["category"], spec["category"])}  # noqa: E731
        texts = (shapes.caption(specs[j]) for j in rng.permutation(len(specs))
                 if shapes.caption(specs[j]) != record["prompt"] and not shapes.check(image, strict(specs[j])))
    out = []
    for text in texts:
        if text not in out:
            out.append(text)
        if len(out) == k:
            return out
    raise ValueError(f"only {len(out)} distractors for {record['prompt']!r}: lower n_candidates")


@torch.no_grad()
def classifier_errors(bb, records, n_candidates=4, seed=0, handle=None, noise_levels=CLASSIFIER_NOISE_LEVELS,
                      batch=256):
    """(R, K) denoising errors averaged over the noise levels, column 0 the record's true caption;
    and the K captions of each record."""
    images = ground_truth_images(records, seed, bb.facts["size"])
    captions = [[r["prompt"]] + distractors(records, i, im, n_candidates - 1, np.random.default_rng([seed, i, 1]))
                for i, (r, im) in enumerate(zip(records, images))]
    unique = sorted({c for row in captions for c in row})
    cond_all = models.cat_conds([models.encode_prompts(bb, unique[i:i + 64]) for i in range(0, len(unique), 64)])
    # the posterior mean (mode=True): the classifier's verdict must not depend on a random draw of the VAE
    x0 = torch.cat([models.encode_images(bb, shapes.to_tensor(np.stack(images[i:i + 16])), mode=True)
                    for i in range(0, len(images), 16)])
    R, L, K, device = len(records), len(noise_levels), n_candidates, bb.device
    noise = torch.randn((R * L,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x0)
    x0 = x0.repeat_interleave(L, dim=0)                                              # row r * L + l
    u = torch.tensor(noise_levels, dtype=torch.float32).repeat(R).to(device)
    x_t, timesteps = models.add_noise(bb, x0, noise, u)
    target = models.target(bb, x0, noise)
    position = {c: j for j, c in enumerate(unique)}
    image_row = torch.arange(R * L).repeat_interleave(K)                            # pair (r, l, k)
    caption_row = torch.tensor([position[c] for row in captions for _ in range(L) for c in row])
    errors = torch.empty(R * L * K)
    with handle.rows(None) if handle is not None else nullcontext():                # every row: set 0
        for s in range(0, R * L * K, batch):
            rows, caps = image_row[s:s + batch].to(device), caption_row[s:s + batch].to(device)
            pred = models.denoise(bb, x_t[rows], timesteps[rows], models.index_cond(cond_all, caps))
            # the per-element mean squared error of losses.pair_errors
            errors[s:s + batch] = (pred.float() - target[rows].float()).pow(2).flatten(1).mean(1).cpu()
    return errors.view(R, L, K).mean(1), captions


def classifier_accuracy(bb, records, n_candidates=4, seed=0, handle=None, noise_levels=CLASSIFIER_NOISE_LEVELS,
                        batch=256):
    """Fraction of records whose true caption has a strictly lower error than all K-1 distractors
    (a tie counts as wrong, so a text-blind model scores 0, not 1/K by the luck of argmin)."""
    errors, _ = classifier_errors(bb, records, n_candidates, seed, handle, noise_levels, batch)
    return float((errors[:, 0] < errors[:, 1:].min(dim=1).values).float().mean())


# -----------------------------------------------------------------------------
# Metrics of a run folder

def generation_metrics(name, scorer, paths, prompts, ref=None):
    if name in ("clip", "pickscore", "imagereward", "hps"):
        score = dict(clip=clip_score, pickscore=pick_score, imagereward=imagereward_score, hps=hps_score)[name]
        values = []
        for i in tqdm(range(0, len(paths), 64), desc=name, leave=False):
            values += score(scorer, [load_image(p) for p in paths[i:i + 64]], prompts[i:i + 64])
        return {name: float(np.mean(values))}
    if name == "fid":
        reference = inception_features(scorer, list_images(ref))
        return {"fid": fid_from_features(inception_features(scorer, paths), reference)}
    # lpips: against the reference image of the same name, centre-cropped and resized to the sample's size
    refs = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(ref)}
    pairs = [(p, refs[k]) for p in paths if (k := os.path.splitext(os.path.basename(p))[0]) in refs]
    if not pairs:
        return skip("lpips", f"no image in {ref} has the name of a sample")
    values = []
    for p, r in tqdm(pairs, desc="lpips", leave=False):
        x, y = load_image(p), to_pil(load_image(r))
        side = min(y.size)
        y = y.crop(((y.width - side) // 2, (y.height - side) // 2, (y.width + side) // 2, (y.height + side) // 2))
        values.append(lpips_distance(scorer, x, np.asarray(y.resize((x.shape[1], x.shape[0]), 2))))
    return {"lpips": float(np.mean(values))}


def pie_items(pie, run):
    """(key, source path, edited path, mask, editing prompt) of the PIE-Bench images the run has. The
    edited image is <run>/annotation_images/<image_path> or <run>/<image_path>, any image extension."""
    with open(os.path.join(pie, "mapping_file.json")) as f:
        mapping = json.load(f)
    items = []
    for key, item in mapping.items():
        stem = os.path.splitext(item["image_path"])[0]
        found = [p for base in (os.path.join(run, "annotation_images"), run) for ext in IMAGE_EXT
                 if os.path.exists(p := os.path.join(base, stem + ext))]
        if found:
            prompt = item["editing_prompt"].replace("[", "").replace("]", "")
            items.append((key, os.path.join(pie, "annotation_images", item["image_path"]), found[0],
                          mask_decode(item["mask"]), prompt))
    return items


def edit_metrics(items, clip=None, lpips_model=None, dino=None):
    """PIE-Bench's evaluate.py: background metrics on both images multiplied by (1 - mask); CLIP on
    the edited image (whole) and on the edited image times the mask (edited region)."""
    values = {}
    for _, src_path, edited_path, mask, prompt in tqdm(items, desc="PIE-Bench", leave=False):
        src, edited = load_image(src_path), load_image(edited_path)
        if src.shape != edited.shape:
            raise SystemExit(f"{edited_path} is {edited.shape[:2]}, its source {src.shape[:2]}: edit at source size")
        if mask.shape != src.shape[:2]:     # PIE-Bench is 512 x 512: other sizes take the nearest mask pixel
            mask = np.asarray(to_pil(np.uint8(mask * 255)).resize(src.shape[1::-1], 0)) / 255.0
            mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
        background = (1 - mask)[..., None]
        row = {}
        if background.sum() > 0:
            a, b = src / 255.0 * background, edited / 255.0 * background
            row.update(bg_psnr=psnr(a, b), bg_ssim=ssim(a, b))
            if lpips_model is not None:
                row["bg_lpips"] = lpips_distance(lpips_model, a * 255, b * 255)
        if dino is not None:
            row["structure_distance"] = structure_distance(dino, src, edited)
        if clip is not None:
            row["clip_whole"] = clip_score(clip, [edited], [prompt])[0]
            row["clip_edited"] = clip_score(clip, [np.uint8(edited * mask[..., None])], [prompt])[0]
        for k, v in row.items():
            values.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}


def load_scorers(metrics, args):
    kw = dict(weights=args.weights, device=args.device)
    loaders = dict(clip=lambda: load_clip("clip", HUB["clip"], **kw),
                   pickscore=lambda: load_clip("pickscore", HUB["pickscore"], processor_id=HUB["pick_processor"], **kw),
                   imagereward=lambda: load_imagereward(**kw), hps=lambda: load_hps(**kw),
                   fid=lambda: load_inception(**kw), lpips=lambda: load_lpips("alex", **kw))
    scorers = {m: loaders[m]() for m in metrics if m in loaders}
    if "edit" in metrics:
        scorers["edit"] = dict(clip=scorers.get("clip") or load_clip("clip", HUB["clip"], **kw),
                               lpips_model=load_lpips("squeeze", **kw), dino=load_dino(**kw))
    if "classifier" in metrics:
        scorers["classifier"] = models.load(args.model, device=args.device)
    return scorers


def token_handle(bb, record):
    """The run's soft tokens attached to bb as sample.py attached them, or None for a plain run."""
    if not record.get("tokens") or record.get("variant") == "plain":
        return None
    import sample
    sets, info = sample.read_tokens(record["tokens"], bb.name, ema=record.get("token_set") == "ema_pos")
    return sample.attach_tokens(bb, sets, info["blocks"])


def classifier_records(n_per_category, which="eval"):
    return shapes.first_per_category(shapes.load_eval_set() if which == "eval" else shapes.load_dev_set(), n_per_category)


def replicate_metrics(run, metric, rows, variant_rows, first, scorers, args, suffix):
    """{column: value} of one metric on one replicate (a folder's images of one variant and seed), or
    None where it does not apply. Folder-level metrics (GenEval, classifier, PIE-Bench) go to the first seed."""
    if metric == "shapes":
        rows = [r for r in rows if "spec" in r]
        images = [load_image(os.path.join(run, r["image"])) for r in rows]
        return {f"shapes_{k}": v for k, v in shapes.score(images, [r["spec"] for r in rows]).items()} if rows else None
    if metric in ("geneval", "classifier", "edit") and not first:
        return None
    if metric == "geneval":
        path = os.path.join(run, f"geneval_results{suffix}.jsonl")
        return read_geneval(path) if os.path.exists(path) else None
    if metric == "classifier":
        bb = scorers["classifier"]
        handle = token_handle(bb, variant_rows[0]) if variant_rows else None
        try:
            return {"classifier": classifier_accuracy(bb, classifier_records(args.classifier_n), args.candidates,
                                                      handle=handle)}
        finally:
            if handle is not None:
                handle.remove()
    if metric == "edit":
        return edit_metrics(pie_items(args.pie, run), **scorers["edit"])
    if scorers.get(metric) is None:
        return None
    paths, prompts = [os.path.join(run, r["image"]) for r in rows], [r["prompt"] for r in rows]
    if not rows and args.pie:                                 # an edit.py folder: PIE-Bench's editing prompts
        items = pie_items(args.pie, run)
        paths, prompts = [it[2] for it in items], [it[4] for it in items]
    return generation_metrics(metric, scorers[metric], paths, prompts, args.ref) if paths else None


def replicates(run, metrics, scorers, args):
    """[(variant, seed, {column: value})] of one run folder, reusing <run>/eval_metrics.json."""
    records = read_records(run)
    cache_path = os.path.join(run, "eval_metrics.json")
    # the settings a cached value depends on: a cache computed with others is stale, not reusable
    settings = {k: getattr(args, k, None) for k in ("model", "classifier_n", "candidates", "ref", "pie")}
    cache = {}
    if not args.recompute and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
        if cache.get("_settings") != settings:
            cache = {}
    cache["_settings"] = settings
    variants = sorted({r.get("variant", "") for r in records}) or [""]
    out = []
    for variant in variants:
        mine = [r for r in records if r.get("variant", "") == variant]
        suffix = f"-{variant}" if len(variants) > 1 else ""
        for n, seed in enumerate(sorted({r.get("seed", 0) for r in mine}) or [None]):
            done, values = cache.setdefault(f"{variant}|{seed}", {}), {}
            rows = [r for r in mine if r.get("seed", 0) == seed]
            for metric in metrics:
                if metric not in done:
                    result = replicate_metrics(run, metric, rows, mine, n == 0, scorers, args, suffix)
                    if result:
                        done[metric] = result
                values.update(done.get(metric, {}))
            out.append((variant, seed, values))
    if records or args.pie:
        with open(cache_path, "w") as f:
            json.dump(cache, f, indent=1)
    return out


# -----------------------------------------------------------------------------
# Table, JSON, plot

def group_name(run, variant):
    name = re.sub(r"-seed\d+$", "", os.path.basename(os.path.normpath(run)))
    return f"{name}[{variant}]" if variant else name


def summarize(rows):
    """[(group, {column: value})] -> {group: {"n", "metrics": {column: {"mean", "std", "values"}}}};
    n counts the replicates, std is the sample std (ddof 1; 0 for a single value)."""
    groups = {}
    for group, values in rows:
        g = groups.setdefault(group, {"n": 0, "metrics": {}})
        g["n"] += 1
        for k, v in values.items():
            g["metrics"].setdefault(k, {"values": []})["values"].append(v)
    for g in groups.values():
        for m in g["metrics"].values():
            v = np.asarray(m["values"], np.float64)
            m["mean"], m["std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return groups


COLUMN_ORDER = ([f"shapes_{c}" for c in shapes.CATEGORIES + ["mean"]] + ["classifier"]
                + [f"geneval_{c}" for c in shapes.CATEGORIES + ["mean"]]
                + ["imagereward", "pickscore", "clip", "hps", "fid", "lpips", "clip_edited", "clip_whole",
                   "structure_distance", "bg_psnr", "bg_lpips", "bg_ssim"])


def markdown_table(groups):
    columns = []
    for g in groups.values():
        columns += [c for c in g["metrics"] if c not in columns]
    columns.sort(key=lambda c: COLUMN_ORDER.index(c) if c in COLUMN_ORDER else len(COLUMN_ORDER))
    head = [c + (f" x{DISPLAY_SCALE[c]}" if c in DISPLAY_SCALE else "") for c in columns]
    lines = ["| run | n | " + " | ".join(head) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, g in groups.items():
        cells = []
        for c in columns:
            m, s = g["metrics"].get(c), DISPLAY_SCALE.get(c, 1)
            cell = "-" if m is None else f"{m['mean'] * s:.4g}"
            if m is not None and len(m["values"]) > 1:
                cell += f" ± {m['std'] * s:.2g}"
            cells.append(cell)
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curve(run, column):
    """(steps, values) of `column` in the run's training CSV (log.csv, else the first *.csv); rows
    where it is empty or missing are skipped."""
    import csv
    paths = [os.path.join(run, "log.csv")] if os.path.exists(os.path.join(run, "log.csv")) \
        else sorted(glob.glob(os.path.join(run, "*.csv")))
    steps, values = [], []
    if paths:
        with open(paths[0]) as f:
            for row in csv.DictReader(f):
                try:
                    step, value = float(row["step"]), float(row[column])
                except (KeyError, TypeError, ValueError):
                    continue
                steps.append(step)
                values.append(value)
    return steps, values


def plot(groups, runs, path, tradeoff=("fid", "imagereward"), curve="score_mean"):
    """Left: one metric against another, a point per row with +- bars (AGSM Fig. 5). Right: each run's
    validation curve from its training CSV (AGSM Fig. 4). Returns (points, curves) drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x, y = tradeoff
    points = 0
    for name, g in groups.items():
        mx, my = g["metrics"].get(x), g["metrics"].get(y)
        if mx and my:
            left.errorbar(mx["mean"], my["mean"], xerr=mx["std"], yerr=my["std"], fmt="o", capsize=3, label=name)
            points += 1
    left.set(xlabel=x, ylabel=y, title=f"{y} vs {x}" if points else f"no run has both {x} and {y}")
    curves = 0
    for run in runs:
        steps, values = read_curve(run, curve)
        if values:
            right.plot(steps, values, marker=".", label=os.path.basename(os.path.normpath(run)))
            curves += 1
    right.set(xlabel="step", ylabel=curve, title=f"validation {curve}" if curves else f"no training CSV with {curve}")
    for ax, n in ((left, points), (right, curves)):
        if n:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points, curves


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=[], help="run folders (records.jsonl + images, or edit.py output)")
    p.add_argument("--metrics", nargs="+", default=["shapes", "geneval"], choices=ALL_METRICS)
    p.add_argument("--ref", default=None, help="reference images for FID and LPIPS (e.g. COCO val 5K)")
    p.add_argument("--pie", default=None, help="PIE-Bench folder: mapping_file.json + annotation_images/")
    p.add_argument("--model", default="tiny-sd3", help="backbone of the classifier metric")
    p.add_argument("--classifier-n", type=int, default=20, help="classifier: eval prompts per category")
    p.add_argument("--candidates", type=int, default=4, help="classifier: captions per image (1 true)")
    p.add_argument("--weights", default=None, help="local folder of metric weights (then no hub access)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recompute", action="store_true", help="ignore the runs' eval_metrics.json caches")
    p.add_argument("--json", default=None, help="results file (default: eval.json beside the first run)")
    p.add_argument("--plot", nargs="?", const="", default=None, help="PNG path (default: eval.png beside the runs)")
    p.add_argument("--tradeoff", nargs=2, default=["fid", "imagereward"], metavar=("X", "Y"))
    p.add_argument("--curve", default="score_mean", help="training-CSV column of the validation curves")
    p.add_argument("--to-geneval", metavar="RUN", help="write RUN's images in GenEval's layout, then exit")
    p.add_argument("--geneval-prompts", help="GenEval's prompts/evaluation_metadata.jsonl (for --to-geneval)")
    p.add_argument("--protocol", choices=["dev", "eval"], help="shapes world: sample and score a prompt set with CIs")
    p.add_argument("--tokens", nargs="*", default=[], help="--protocol: token files to score beside the base")
    p.add_argument("--ema", action="store_true", help="--protocol: sample AGSM files with their EMA tokens")
    p.add_argument("--pretrained", default=None, help="--protocol: the backbone's weights folder")
    p.add_argument("--n-per-category", type=int, default=0, help="--protocol: first N prompts per category")
    p.add_argument("--grid", default=None, help="--protocol: PNG of base | tokens, first prompt per category")
    return p.parse_args(argv)


def check_args(args):
    for run in args.runs + ([args.to_geneval] if args.to_geneval else []):
        if not os.path.isdir(run):
            raise SystemExit(f"no run folder {run}")
    if not args.runs and not args.to_geneval:
        raise SystemExit("nothing to do: pass --runs FOLDER ... or --to-geneval RUN")
    if args.to_geneval and not (args.geneval_prompts and os.path.exists(args.geneval_prompts)):
        raise SystemExit("--to-geneval needs --geneval-prompts, GenEval's prompts/evaluation_metadata.jsonl")
    if ({"fid", "lpips"} & set(args.metrics)) and not (args.ref and os.path.isdir(args.ref)):
        raise SystemExit("fid / lpips need --ref DIR, a folder of reference images")
    if "edit" in args.metrics and not (args.pie and os.path.exists(os.path.join(args.pie, "mapping_file.json"))):
        raise SystemExit("edit needs --pie DIR, PIE-Bench's folder with mapping_file.json and annotation_images/")
    if "classifier" in args.metrics:
        models.check_name(args.model)
    if args.weights is not None and not os.path.isdir(args.weights):
        raise SystemExit(f"--weights {args.weights} is not a folder")


def export_geneval(run, prompts_file):
    with open(prompts_file) as f:
        metadata = [json.loads(line) for line in f if line.strip()]
    records = read_records(run)
    variants = sorted({r.get("variant", "") for r in records})
    for variant in variants:
        by_prompt = {}
        for r in records:
            if r.get("variant", "") == variant:
                by_prompt.setdefault(r["prompt"], []).append(os.path.join(run, r["image"]))
        suffix = f"-{variant}" if len(variants) > 1 else ""
        out = os.path.join(run, f"geneval{suffix}")
        write_geneval(by_prompt, metadata, out)
        print(f"wrote {out}; score it with GenEval's `python evaluation/evaluate_images.py {out} "
              f"--outfile {os.path.join(run, f'geneval_results{suffix}.jsonl')}`, then run eval.py again")


# -----------------------------------------------------------------------------
# The shapes world's protocol (shapes.protocol_seeds / protocol_scores)

def protocol_images(bb, records, which, handle=None, batch=128, steps=None):
    """Every record sampled with its SAMPLES_PER_PROMPT seeds, in protocol order (prompt-major)."""
    import sample
    pairs = shapes.protocol_seeds(len(records), which=which)
    images = []
    for i in tqdm(range(0, len(pairs), batch), desc=f"sample {which}", leave=False):
        part = pairs[i:i + batch]
        images.append(sample.generate(bb, [records[p]["prompt"] for p, _ in part], [s for _, s in part],
                                      steps=steps, handle=handle))
    return torch.cat(images)


def protocol_records(which, n_per_category=0):
    return classifier_records(n_per_category, which)


def protocol_table(results):
    """Markdown: one row per variant, each column 'value [low, high]'."""
    columns = list(next(iter(results.values())))
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c][0]:.3f} [{scores[c][1]:.3f}, {scores[c][2]:.3f}]"
                                                for c in columns) + " |")
    return "\n".join(lines)


def run_protocol(args):
    """--protocol: base and each --tokens file on the dev or eval prompts, 4 seeds each, with intervals."""
    import sample
    bb = models.load(args.model, pretrained=args.pretrained, device=args.device)
    records = protocol_records(args.protocol, args.n_per_category)
    specs = [r["spec"] for r in records]
    variants = [("base", None)] + [(f"tokens {path}", path) for path in args.tokens]
    results, grids = {}, []
    first = [next(i for i, r in enumerate(records) if r["spec"]["category"] == c) for c in shapes.CATEGORIES]
    for name, path in variants:
        handle = None
        if path is not None:
            sets, info = sample.read_tokens(path, args.model, ema=args.ema)
            handle = sample.attach_tokens(bb, sets, info["blocks"])
        try:
            images = protocol_images(bb, records, args.protocol, handle)
        finally:
            if handle is not None:
                handle.remove()
        results[name] = shapes.protocol_scores(images, specs)
        print(f"{name}: {shapes.format_scores(results[name])}", flush=True)
        grids.append(torch.stack([images[shapes.SAMPLES_PER_PROMPT * i + k] for i in first for k in range(2)]))
    print(protocol_table(results))
    out = args.json or f"protocol-{args.model}-{args.protocol}.json"
    with open(out, "w") as f:
        json.dump({"model": args.model, "set": args.protocol, "prompts": len(records),
                   "samples_per_prompt": shapes.SAMPLES_PER_PROMPT, "results": results}, f, indent=1)
    if args.grid:   # rows: the first prompt of each category x 2 seeds; columns: base | each token file
        cells = torch.stack([g[j] for j in range(len(grids[0])) for g in grids])
        sample.save_grid(cells, args.grid, per_cell=len(grids), columns=2)
        print(f"wrote {args.grid}")
    print(f"wrote {out}")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.protocol:
        models.check_name(args.model)
        for path in args.tokens:
            if not os.path.exists(path):
                raise SystemExit(f"--tokens {path}: no such file")
        return run_protocol(args)
    check_args(args)
    if args.to_geneval:
        return export_geneval(args.to_geneval, args.geneval_prompts)
    scorers = load_scorers(args.metrics, args)
    rows = []
    for run in args.runs:
        rows += [(group_name(run, variant), values)
                 for variant, _, values in replicates(run, args.metrics, scorers, args)]
    if not any(values for _, values in rows):   # no run gave a single number
        raise SystemExit(f"found no images to score in {' '.join(args.runs)}: pass folders written by sample.py "
                         f"(records.jsonl + images) or edit.py")
    groups = summarize(rows)
    print(markdown_table(groups))
    beside = os.path.dirname(os.path.abspath(os.path.normpath(args.runs[0])))
    json_path = args.json or os.path.join(beside, "eval.json")
    with open(json_path, "w") as f:
        json.dump({"runs": args.runs, "groups": groups}, f, indent=1)
    print(f"wrote {json_path}")
    if args.plot is not None:
        png = args.plot or os.path.join(beside, "eval.png")
        plot(groups, args.runs, png, tuple(args.tradeoff), args.curve)
        print(f"wrote {png}")
    return groups


if __name__ == "__main__":
    main()
