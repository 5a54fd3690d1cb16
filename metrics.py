"""
metrics.py: the image metrics of both papers' tables, each behind a small adapter (SoftREPA Tables 1-2,
AGSM Tables 1-2): eval.py runs them over folders of images.

  clip          CLIP score, 100 * max(cos, 0), ViT-L/14 (torchmetrics' CLIPScore definition)
  pickscore     PickScore_v1 (CLIP-H), logit_scale * cos
  imagereward   ImageReward-v1.0;  hps: HPSv2.1
  fid, lpips    FID against reference images (Inception pool3, pytorch-fid's weights, the papers' ref.
                [34]); LPIPS of each image against the reference image of the same file name (the papers
                do not say what their COCO LPIPS compares with; this pairing is our reading)
  edit          the editing benchmarks' metrics (benchmarks.py): CLIP edited region / whole, background PSNR /
                LPIPS / SSIM outside the edit mask and DINO structure distance, as PIE-Bench's evaluate.py
FID's Frechet distance, PSNR and SSIM are written out here. Each loader returns the scorer, or None after
one line saying why it is skipped. CLIP score and PickScore are both CLIP models: scored here with
transformers (one code path for both, and testable with tiny local models). HPSv2.1 is an open_clip
ViT-H-14 with the HPS weights: the hpsv2 package pins pytest==7.2.0 and protobuf<4 (it would downgrade
this project's test runner) and first downloads the 4 GB LAION weights that the HPS checkpoint then
overwrites, so its ten-line score() is repeated on open_clip. ImageReward (BLIP) and LPIPS use their
packages; Inception uses pytorch-fid, the code the papers cite for FID.
"""

import glob
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data

HUB = dict(
    clip="openai/clip-vit-large-patch14",
    pickscore="yuvalkirstain/PickScore_v1",
    pick_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    dino="facebook/dino-vitb8",
    hps=("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    imagereward="ImageReward-v1.0",
)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image(path):
    """uint8 (H, W, 3), with a one-line error that says what to do."""
    return data.read_image(path, fix="re-sample it, or drop its line from records.jsonl")


def to_pil(image):
    from PIL import Image

    return Image.fromarray(image)


def list_images(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXT))


# -----------------------------------------------------------------------------
# Written out: Frechet distance, PSNR, SSIM


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
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(x, y, data_range=1.0, window=11, sigma=1.5):
    """SSIM of two (H, W, C) images: Gaussian 11x11 (sigma 1.5) local statistics, mean over the windows
    that fit in the image and over channels (torchmetrics' StructuralSimilarityIndexMeasure):
    SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))."""
    t = lambda a: torch.as_tensor(np.asarray(a, np.float64)).permute(2, 0, 1).unsqueeze(1)  # noqa: E731
    x, y = t(x), t(y)  # (C, 1, H, W)
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).view(1, 1, window, window)
    blur = lambda a: F.conv2d(a, kernel)  # noqa: E731  valid windows only
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


# -----------------------------------------------------------------------------
# Metric models


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
        inputs = processor(
            text=list(prompts[i : i + batch]),
            images=[to_pil(im) for im in images[i : i + batch]],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )
        o = model(**{k: v.to(device) for k, v in inputs.items()})
        out.append((o.image_embeds * o.text_embeds).sum(-1).float().cpu())  # both are L2-normalised
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
        pixels = torch.stack([preprocess(to_pil(im)) for im in images[i : i + batch]]).to(device)
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(list(prompts[i : i + batch])).to(device), normalize=True)
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
    try:  # the 2048-d pool3 features of the TF-ported FID Inception (pt_inception-2015-12-05)
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        return skip(
            "fid",
            f"cannot load the FID Inception weights: {type(e).__name__}; offline, put "
            f"pt_inception-2015-12-05-6726825d.pth in --weights DIR/checkpoints/",
        )


@torch.no_grad()
def inception_features(model, paths, batch=50):
    device, out = next(model.parameters()).device, []
    for i in tqdm(range(0, len(paths), batch), desc="inception", leave=False):
        x = torch.stack([torch.from_numpy(load_image(p).copy()).permute(2, 0, 1) for p in paths[i : i + batch]])
        out.append(model(x.float().div(255).to(device))[0].flatten(1).cpu())  # in [0, 1]; resized inside
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
        return skip(
            "lpips",
            f"cannot load the {net} backbone: {type(e).__name__}; offline, put torchvision's "
            f"{net} weights in --weights DIR/checkpoints/",
        )


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
    scale = size / min(x.shape[-2:])  # shorter side -> 224, like Resize(224)
    x = F.interpolate(
        x,
        size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
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
# The adapters: one row per metric of a folder of generated images, saying how its model loads
# (weights: a local folder, or None for the hub) and what it computes from (scorer, paths, prompts, ref).


def mean_per_image(score):
    def run(scorer, paths, prompts, ref=None):
        values = []
        for i in tqdm(range(0, len(paths), 64), desc=score.__name__, leave=False):
            values += score(scorer, [load_image(p) for p in paths[i : i + 64]], prompts[i : i + 64])
        return float(np.mean(values))

    return run


def fid_against(scorer, paths, prompts, ref):
    return fid_from_features(inception_features(scorer, paths), inception_features(scorer, list_images(ref)))


def lpips_against(scorer, paths, prompts, ref):
    """LPIPS against the reference image of the same name, resized and centre-cropped to the sample's size."""
    refs = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(ref)}
    pairs = [(p, refs[k]) for p in paths if (k := os.path.splitext(os.path.basename(p))[0]) in refs]
    if not pairs:
        return skip("lpips", f"no image in {ref} has the name of a sample")
    values = []
    for p, r in tqdm(pairs, desc="lpips", leave=False):
        x = load_image(p)
        values.append(lpips_distance(scorer, x, data.read_image(r, x.shape[0])))
    return float(np.mean(values))


METRICS = {
    "clip": dict(
        load=lambda weights, device: load_clip("clip", HUB["clip"], weights, device=device),
        run=mean_per_image(clip_score),
    ),
    "pickscore": dict(
        load=lambda weights, device: load_clip("pickscore", HUB["pickscore"], weights, HUB["pick_processor"], device),
        run=mean_per_image(pick_score),
    ),
    "imagereward": dict(load=load_imagereward, run=mean_per_image(imagereward_score)),
    "hps": dict(load=load_hps, run=mean_per_image(hps_score)),
    "fid": dict(load=load_inception, run=fid_against),
    "lpips": dict(load=lambda weights, device: load_lpips("alex", weights, device), run=lpips_against),
}


def load_scorers(names, weights=None, device="cpu"):
    """{metric: its loaded model, or None if it cannot load}; "edit" gets PIE-Bench's three models."""
    scorers = {m: METRICS[m]["load"](weights, device) for m in names if m in METRICS}
    if "edit" in names:
        scorers["edit"] = dict(
            clip=scorers.get("clip") or METRICS["clip"]["load"](weights, device),
            lpips_model=load_lpips("squeeze", weights, device),
            dino=load_dino(weights, device),
        )
    return scorers


def generation_metric(name, scorer, paths, prompts, ref=None):
    """{name: value} of metric `name` on images `paths` with their prompts (fid / lpips: against `ref`)."""
    value = METRICS[name]["run"](scorer, paths, prompts, ref)
    return None if value is None else {name: value}


# -----------------------------------------------------------------------------
# GenEval 2 scored with Soft-TIFA (Kamath et al., "GenEval 2: Addressing Benchmark Drift in Text-to-Image
# Evaluation", arXiv 2512.16853; data and scorer: github.com/facebookresearch/GenEval2, evaluation.py and
# soft_tifa_analysis.py). Each prompt of geneval2_data.jsonl holds its atoms as VQA pairs (`vqa_list`,
# [question, answer]) with one skill each (`skills`) and its compositionality (`atom_count`; "a" and "and"
# are asked about but not counted). An atom's soft score is the VQA model's probability of the correct
# answer given the image. Soft-TIFA AM averages a prompt's scores arithmetically (atom level), GM
# geometrically (prompt level: one missed atom sinks the prompt); both are then averaged over the prompts.
# The official code also scores two older methods, from the same VQA model: hard TIFA (Hu et al. 2023), an
# atom right when the model's most likely first token is a spelling of the answer, and VQAScore (Lin et al.
# 2024), one question per prompt ("Does this image show ...?") scored by the probability of "Yes".
# Its evaluation.py saves, per method, score_lists.json: a list over the benchmark's prompts, in the file's
# order, of each prompt's list of atom scores ([score] for VQAScore); geneval2_score_lists returns that.

GENEVAL2_VQA = "Qwen/Qwen3-VL-8B-Instruct"  # the VQA model of GenEval 2's evaluation.py
GENEVAL2_SKILLS = ("object", "attribute", "count", "position", "verb")
GENEVAL2_ATOM_COUNTS = range(3, 11)  # the atom counts of the benchmark's 800 prompts, 100 each
NUMBER_WORDS = dict(one=1, two=2, three=3, four=4, five=5, six=6, seven=7, eight=8, nine=9, ten=10)
SOFT_TIFA_COLUMNS = (
    ["soft_tifa_am", "soft_tifa_gm"]
    + [f"soft_tifa_am_{skill}" for skill in GENEVAL2_SKILLS]
    + [f"soft_tifa_gm_atoms{k}" for k in GENEVAL2_ATOM_COUNTS]
)
# eval.py's GenEval 2 metrics -> the name of their score lists: evaluation.py's --method (its soft_tifa_am
# and soft_tifa_gm write the same lists, and differ only in the mean taken of them)
GENEVAL2_METRICS = {"soft-tifa": "soft_tifa", "tifa": "tifa", "vqascore": "vqascore"}
GENEVAL2_COLUMNS = SOFT_TIFA_COLUMNS + ["tifa", "vqascore"]
# The texts evaluation.py asks the VQA model, each as the one user turn after the image: an atom's question
# (tifa and soft_tifa), and VQAScore's one question per prompt with the answers it counts (vqa_score)
ATOM_TEXT = "{question} Answer in one word."
VQASCORE_TEXT = 'Does this image show "{prompt}"? Answer the question with Yes or No.'
VQASCORE_ANSWERS = ("Yes", "yes", " yes", " Yes")


def read_geneval2(path):
    """The benchmark's prompts: [{"prompt", "atom_count", "vqa_list", "skills"}], a one-line error for a
    line that lacks a field or has a skill per VQA pair that does not line up."""
    expected = 'one GenEval 2 prompt: {"prompt", "atom_count", "vqa_list": [[question, answer], ...], "skills"}'
    items = []
    for n, item in data.json_lines(path, expected):
        pairs, skills = item.get("vqa_list"), item.get("skills")
        if not (
            isinstance(item.get("prompt"), str)
            and isinstance(item.get("atom_count"), int)
            and isinstance(pairs, list)
            and isinstance(skills, list)
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs)
        ):
            raise SystemExit(f"{path}:{n}: not a GenEval 2 line; each line is {expected}")
        if not pairs or len(pairs) != len(skills):
            raise SystemExit(f"{path}:{n}: {len(pairs)} VQA pairs and {len(skills)} skills; one skill per pair")
        unknown = sorted(set(skills) - set(GENEVAL2_SKILLS))
        if unknown:  # soft_tifa_analysis.py stops on them too
            raise SystemExit(f"{path}:{n}: unknown skill {unknown[0]!r}; GenEval 2's are {', '.join(GENEVAL2_SKILLS)}")
        items.append({k: item[k] for k in ("prompt", "atom_count", "vqa_list", "skills")})
    if not items:
        raise SystemExit(f"{path} has no prompts")
    return items


def geometric_mean(values):
    """(prod v)^(1/n), 0 if any value is 0 (scipy.stats.gmean, which GenEval 2 uses)."""
    values = np.asarray(values, np.float64)
    if (values <= 0).any():
        return 0.0
    return float(np.exp(np.log(values).mean()))


def soft_tifa_scores(answer_probs, skills, atom_counts):
    """Soft-TIFA of a set of images, one per benchmark prompt, from the probabilities of the correct answers.

    answer_probs[i][j]: the probability of prompt i's j-th atom; skills[i][j]: that atom's skill;
    atom_counts[i]: prompt i's atom count. Returns, in [0, 1] (the paper prints x100):
      soft_tifa_am / soft_tifa_gm: the mean over prompts of each prompt's arithmetic / geometric mean
      soft_tifa_am_<skill>: the mean over every atom of that skill, pooled over prompts (atom level, AM)
      soft_tifa_gm_atoms<k>: the mean of the geometric means of the prompts with k atoms (prompt level, GM)
    As in GenEval 2's evaluation.py and soft_tifa_analysis.py; a skill or atom count that no prompt has
    gets no column."""
    if not (len(answer_probs) == len(skills) == len(atom_counts)) or not answer_probs:
        raise ValueError("one list of probabilities, one list of skills and one atom count per prompt")
    am = [float(np.mean(p)) for p in answer_probs]
    gm = [geometric_mean(p) for p in answer_probs]
    scores = {"soft_tifa_am": float(np.mean(am)), "soft_tifa_gm": float(np.mean(gm))}
    by_skill = {}
    for probs, names in zip(answer_probs, skills):
        if len(probs) != len(names):
            raise ValueError(f"{len(probs)} probabilities and {len(names)} skills for one prompt")
        for p, skill in zip(probs, names):
            by_skill.setdefault(skill, []).append(p)
    if set(by_skill) - set(GENEVAL2_SKILLS):
        raise ValueError(f"unknown skills {sorted(set(by_skill) - set(GENEVAL2_SKILLS))}")
    for skill in (s for s in GENEVAL2_SKILLS if s in by_skill):
        scores[f"soft_tifa_am_{skill}"] = float(np.mean(by_skill[skill]))
    for k in sorted(set(atom_counts)):
        scores[f"soft_tifa_gm_atoms{k}"] = float(np.mean([g for g, c in zip(gm, atom_counts) if c == k]))
    return scores


def answer_variants(question, answer):
    """The spellings of a correct answer whose first tokens count as that answer: the word capitalised or
    not, with and without a leading space, and for "How many" the digits too (GenEval 2's evaluation.py,
    which sums the probabilities of these first tokens; its yes/no answers are all "Yes")."""
    word = answer.strip()
    spellings = [word.lower(), word.capitalize()]
    if question.startswith("How many") and word.lower() in NUMBER_WORDS:
        spellings.append(str(NUMBER_WORDS[word.lower()]))
    variants = []
    for s in spellings:
        variants += [s, " " + s]
    return variants


def load_geneval2(benchmark, vqa_folder, device="cpu", metric="soft-tifa"):
    """(GenEval 2's prompts, (VQA model, its processor)) from the benchmark file and a local folder holding
    any transformers image-text-to-text model, or None after one line saying why `metric` is skipped."""
    if benchmark is None or not os.path.isfile(benchmark):
        where = f"no file {benchmark}" if benchmark else "no --geneval2 FILE"
        return skip(metric, f"{where}: GenEval 2's geneval2_data.jsonl (github.com/facebookresearch/GenEval2)")
    items = read_geneval2(benchmark)
    if vqa_folder is None or not os.path.isdir(vqa_folder):
        where = f"no folder {vqa_folder}" if vqa_folder else "no --vqa-model DIR"
        return skip(metric, f"{where}: a local image-text-to-text model, e.g. GenEval 2's {GENEVAL2_VQA}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(vqa_folder)
        model = AutoModelForImageTextToText.from_pretrained(vqa_folder, dtype="auto").to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        return skip(metric, f"cannot load {vqa_folder} as an image-text-to-text model: {type(e).__name__}")
    return items, (model, processor)


def geneval2_versions(vqa_folder, vqa=None):
    """What a GenEval 2 number depends on beyond the images: the VQA model (its folder's name; its dtype, once
    loaded) and the library versions (GenEval 2 pins transformers 4.57.0; in bf16 other versions move atoms)."""
    import transformers

    return dict(
        vqa_model=os.path.basename(os.path.normpath(vqa_folder)),
        vqa_dtype=None if vqa is None else str(vqa[0].dtype).removeprefix("torch."),
        transformers=transformers.__version__,
        torch=torch.__version__,
    )


def vqa_inputs(vqa, image, text):
    """The model's inputs for one uint8 (H, W, 3) image and one text: evaluation.py's one user turn (the
    image, then the text) in the processor's chat template, ending where the answer begins."""
    model, processor = vqa
    turn = [{"type": "image", "image": to_pil(image)}, {"type": "text", "text": text}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": turn}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    return inputs.to(model.device, dtype=model.dtype)  # only the floating tensors (pixels) take the dtype


@torch.no_grad()
def first_answer_token(vqa, image, text):
    """The distribution of the answer's first token, a softmax over the vocabulary (float32), given the image
    and the text. One forward pass, no generation: evaluation.py reads the same distribution off generate()'s
    first scores (max_new_tokens=1, greedy)."""
    model, _ = vqa
    logits = model(**vqa_inputs(vqa, image, text), logits_to_keep=1).logits[0, -1]
    return torch.softmax(logits.float(), -1)


def answer_probability(probs, tokenizer, spellings):
    """The probability of an answer: `probs` summed over the distinct first tokens of its spellings."""
    ids = {tokenizer(s, add_special_tokens=False).input_ids[0] for s in spellings}
    return float(probs[sorted(ids)].sum())


def argmax_is_answer(probs, tokenizer, spellings):
    """Hard TIFA's verdict: the most likely first token, decoded and lower-cased, is one of the spellings
    (evaluation.py's tifa: pred.lower() in answer_list)."""
    return tokenizer.decode([int(probs.argmax())]).lower() in spellings


def geneval2_score_lists(scorer, paths, prompts, methods):
    """{method: its score lists} for the GenEval 2 `methods` (GENEVAL2_METRICS' values) of one replicate's
    images (the records' paths and prompts): for each benchmark prompt, in the file's order, its atoms'
    probabilities of the correct answer (soft_tifa), their hard 0 / 1 verdicts (tifa), or [VQAScore]
    (vqascore) -- evaluation.py's score_lists.json. Soft and hard TIFA read the same forward pass.
    None if no image is of a benchmark prompt. One image per prompt: a run that misses some prompt, or
    holds two images of one, is a one-line error, since GenEval 2 scores each prompt's one image."""
    items, vqa = scorer
    tokenizer = vqa[1].tokenizer
    benchmark = {item["prompt"] for item in items}
    by_prompt = {}
    for path, prompt in zip(paths, prompts):
        if prompt in benchmark:
            by_prompt.setdefault(prompt, []).append(path)
    if not by_prompt:
        return None
    missing = len(benchmark - set(by_prompt))
    if missing:
        raise SystemExit(
            f"no image for {missing} of the {len(benchmark)} GenEval 2 prompts; sample every prompt of the "
            f"benchmark file (sample.py --prompts FILE)"
        )
    twice = next((p for p, found in by_prompt.items() if len(found) > 1), None)
    if twice is not None:
        raise SystemExit(
            f"{len(by_prompt[twice])} images of the GenEval 2 prompt {twice!r} in one seed and variant; "
            f"GenEval 2 scores one image per prompt"
        )
    lists = {method: [] for method in methods}
    for item in tqdm(items, desc="geneval2", leave=False):
        image = load_image(by_prompt[item["prompt"]][0])
        if "soft_tifa" in methods or "tifa" in methods:
            soft, hard = [], []
            for question, answer in item["vqa_list"]:
                probs = first_answer_token(vqa, image, ATOM_TEXT.format(question=question))
                spellings = answer_variants(question, answer)
                soft.append(answer_probability(probs, tokenizer, spellings))
                hard.append(int(argmax_is_answer(probs, tokenizer, spellings)))
            for method, scores in (("soft_tifa", soft), ("tifa", hard)):
                if method in lists:
                    lists[method].append(scores)
        if "vqascore" in methods:
            probs = first_answer_token(vqa, image, VQASCORE_TEXT.format(prompt=item["prompt"]))
            lists["vqascore"].append([answer_probability(probs, tokenizer, VQASCORE_ANSWERS)])
    return lists


def geneval2_columns(method, score_lists, items):
    """The table's columns of one method's score lists (in the benchmark's order, `items`): Soft-TIFA's
    (soft_tifa_scores); hard TIFA and VQAScore as evaluation.py totals them, the mean over prompts of each
    prompt's mean (in [0, 1]; evaluation.py prints x100)."""
    if method == "soft_tifa":
        return soft_tifa_scores(
            score_lists, [item["skills"] for item in items], [item["atom_count"] for item in items]
        )
    return {method: float(np.mean([np.mean(scores) for scores in score_lists]))}
