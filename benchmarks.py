"""
benchmarks.py: the text-guided editing benchmarks of both papers, read from their folders as released,
and their metrics -- PIE-Bench (AGSM app. F, Table 10; SoftREPA Table 2), DIV2K with captions and
Cat2Dog (SoftREPA sec. 4 "Text Guided Image Editing", Table 2, app. C and F, Tables 8-9).

`read(folder)` gives one record per edit: {name, image, src, tgt, mask}. `name` is the image's path
inside the benchmark, which is where edit.py --bench writes its edit (so that a folder of edits lines
up with its sources), and `mask` the edited region (PIE-Bench) or None (the others have no masks, which
is why SoftREPA's Table 2 leaves CLIP-edited, PSNR and SSIM blank for them). The layouts:

  PIE-Bench  <dir>/mapping_file.json: {key: {image_path, original_prompt, editing_prompt, mask}}, the
             images in <dir>/annotation_images/<image_path>; the prompts mark the edit with [brackets]
             (dropped here) and the mask is run-length coded (mask_decode).
  DIV2K      <dir>/prompts_editing.json: a JSON list of {"img_path", "prompt", "tgt_prompt"} -- the
             layout of SoftREPA's samples/prompts_editing.json, the one released trace of its captions
             (app. C: source captions by LLaVA, targets by Llama-3.1 replacing one object) -- the images
             in <dir>/<img_path> or <dir>/DIV2K_train_HR/<img_path> (DIV2K's 0001.png ... 0800.png).
  Cat2Dog    AFHQ's cat images, <dir>/{val,train}/cat/*.jpg or <dir>/cat/*.jpg, with their prompts in a
             prompts_editing.json as above when there is one; otherwise every image is edited from
             "a photo of a cat" to "a photo of a dog". (That pair is ours: SoftREPA names the set, not its
             prompts.)

    python edit.py --model sd3 --bench DIV2K --tokens t.safetensors --out out/div2k     # edits, both ways
    python eval.py --runs out/div2k/plain out/div2k/tokens --metrics edit clip imagereward --bench DIV2K
"""

import glob
import os

import numpy as np
from tqdm import tqdm

import files
import metrics

PROMPTS = "prompts_editing.json"
CAT2DOG = ("a photo of a cat", "a photo of a dog")


def kind(folder):
    """Which benchmark a folder holds, or a one-line error that says what each layout needs."""
    if os.path.exists(os.path.join(folder, "mapping_file.json")):
        return "pie"
    if cat_images(folder):
        return "cat2dog"
    if os.path.exists(os.path.join(folder, PROMPTS)):
        return "div2k"
    raise files.refuse(
        "--bench",
        folder,
        f"an editing benchmark folder: PIE-Bench's has mapping_file.json, DIV2K's with captions {PROMPTS}, "
        f"Cat2Dog's (AFHQ) val/cat/ or cat/ images",
    )


def cat_images(folder):
    found = []
    for sub in ("val/cat", "train/cat", "cat"):
        found += sorted(p for p in glob.glob(os.path.join(folder, sub, "*")) if p.lower().endswith(metrics.IMAGE_EXT))
    return found


PIE_KEYS = ("image_path", "original_prompt", "editing_prompt", "mask")
DIV2K_KEYS = ("img_path", "prompt", "tgt_prompt")


def read(folder):
    """The records of a benchmark folder (see the layouts above), in the benchmark's order."""
    which = kind(folder)
    if which == "pie":
        mapping = files.read_benchmark_index(os.path.join(folder, "mapping_file.json"), dict, PIE_KEYS)
        clean = lambda text: text.replace("[", "").replace("]", "")  # noqa: E731  (PIE marks the edit in brackets)
        return [
            dict(
                name=item["image_path"],
                image=os.path.join(folder, "annotation_images", item["image_path"]),
                src=clean(item["original_prompt"]),
                tgt=clean(item["editing_prompt"]),
                mask=item["mask"],
                key=key,
            )
            for key, item in mapping.items()
        ]
    listed = {}
    if os.path.exists(os.path.join(folder, PROMPTS)):
        entries = files.read_benchmark_index(os.path.join(folder, PROMPTS), list, DIV2K_KEYS)
        listed = {e["img_path"]: (e["prompt"].strip(), e["tgt_prompt"].strip()) for e in entries}
    if which == "cat2dog":
        records = []
        for path in cat_images(folder):
            name = os.path.relpath(path, folder)
            src, tgt = listed.get(name, listed.get(os.path.basename(path), CAT2DOG))
            records.append(dict(name=name, image=path, src=src, tgt=tgt, mask=None, key=name))
        return records
    records = []
    for name, (src, tgt) in listed.items():
        path = next(
            (
                p
                for p in (os.path.join(folder, name), os.path.join(folder, "DIV2K_train_HR", name))
                if os.path.exists(p)
            ),
            None,
        )
        if path is None:
            raise SystemExit(f"{folder}/{PROMPTS} names {name}, which is neither in {folder} nor in DIV2K_train_HR/")
        records.append(dict(name=name, image=path, src=src, tgt=tgt, mask=None, key=name))
    return records


def items(folder, run):
    """(key, source path, edited path, mask or None, target prompt) of the benchmark's images that `run`
    has edited: <run>/annotation_images/<name> or <run>/<name>, any image extension."""
    out = []
    for record in read(folder):
        stem = os.path.splitext(record["name"])[0]
        found = [
            p
            for base in (os.path.join(run, "annotation_images"), run)
            for ext in metrics.IMAGE_EXT
            if os.path.exists(p := os.path.join(base, stem + ext))
        ]
        if found:
            mask = None if record["mask"] is None else mask_decode(record["mask"])
            out.append((record["key"], record["image"], found[0], mask, record["tgt"]))
    return out


def mask_decode(rle, shape=(512, 512)):
    """PIE-Bench's mask: (start, length) pairs over the flattened image, 1 = edited region. Like its
    evaluate.py, the one-pixel border counts as edited ("to avoid annotation errors in boundary")."""
    mask = np.zeros(shape[0] * shape[1], np.float32)
    for start, length in zip(rle[0::2], rle[1::2]):
        mask[start : start + length] = 1
    mask = mask.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def edit_metrics(items, clip=None, lpips_model=None, dino=None):
    """PIE-Bench's evaluate.py: background metrics on both images multiplied by (1 - mask); CLIP on the
    edited image (whole) and on the edited image times the mask (edited region). Without a mask (DIV2K,
    Cat2Dog) the whole-image ones, as SoftREPA's Table 2: CLIP whole, LPIPS whole, structure distance."""
    values = {}
    for _, src_path, edited_path, mask, prompt in tqdm(items, desc="editing metrics", leave=False):
        src, edited = metrics.load_image(src_path), metrics.load_image(edited_path)
        if src.shape != edited.shape:  # edit.py --bench edits at the model's size: compare at that size
            from PIL import Image

            src = np.asarray(Image.fromarray(src).resize(edited.shape[1::-1], Image.BICUBIC))
        row = {}
        if mask is not None and mask.shape != src.shape[:2]:  # PIE-Bench is 512 x 512: nearest mask pixel
            mask = np.asarray(metrics.to_pil(np.uint8(mask * 255)).resize(src.shape[1::-1], 0)) / 255.0
            mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
        if mask is None and lpips_model is not None:
            row["lpips_whole"] = metrics.lpips_distance(lpips_model, src.astype(np.float64), edited.astype(np.float64))
        if mask is not None and (1 - mask).sum() > 0:
            background = (1 - mask)[..., None]
            a, b = src / 255.0 * background, edited / 255.0 * background
            row.update(bg_psnr=metrics.psnr(a, b), bg_ssim=metrics.ssim(a, b))
            if lpips_model is not None:
                row["bg_lpips"] = metrics.lpips_distance(lpips_model, a * 255, b * 255)
        if dino is not None:
            row["structure_distance"] = metrics.structure_distance(dino, src, edited)
        if clip is not None:
            row["clip_whole"] = metrics.clip_score(clip, [edited], [prompt])[0]
            if mask is not None:
                row["clip_edited"] = metrics.clip_score(clip, [np.uint8(edited * mask[..., None])], [prompt])[0]
        for k, v in row.items():
            values.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}
