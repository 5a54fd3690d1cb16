"""
data.py: the image-caption pairs that train.py trains on, and the optional encoding cache.

Sources, picked by `--data`:
  stream      a source whose batches are drawn rather than read: `draw(step, rank, batch)`. train.py
              opens the shapes world's stream this way (`--data shapes`, shapes/pairs.py)
  COCO        a folder holding annotations/captions_{train,val}{2014,2017}.json and the image folder
              {train,val}{2014,2017}/, or the captions_*.json file itself. Every image has ~5
              captions; a random one is used per image and epoch (as SoftREPA's COCO loader does).
  JSONL       one pair per line: {"image": path, "caption": str} (or "captions": [...], "file_name",
              "text"); relative paths are relative to the file
  folder      image files, each with a caption file of the same name ending in .txt (one per line)
  cache       a folder written by `python data.py cache` (below)
Images are resized (shorter side) and centre-cropped to the training size, in [-1, 1].

Order. What a batch holds is a function of (seed, step, rank) alone, so that a resumed run sees
exactly the data an uninterrupted one would have seen, without saving any loader state:
  epoch e has its own permutation of the images and its own caption draw, from the seed (seed, e);
  a step takes world x batch images of it, rank r the r-th run of `batch`; the last incomplete
  global batch of an epoch is dropped (used only as spare images, see below).
A corrupt or missing image is skipped: its slot takes the next readable image after the step's
images in the epoch order (deterministic, so resuming repeats it exactly). Each rank counts the
distinct unreadable images it has met; train.py sums them over ranks into its log.

Encoding cache (real backbones). Latents and frozen text-encoder outputs cost a VAE and up to three
text encoders per step; `python data.py cache` computes them once. The released SoftREPA code writes
three .pt files per sample in fp32 (COCO: 9.1 TB for SD3 by their README). Here each field goes to a
few large raw shard files (one per ~`--shard-gb`), stored in bf16 (or fp16, or fp32 to train exactly as
from the images) and memory-mapped when training, so a batch reads only its own rows. The latents are the
VAE posterior's mean, which is also what training from images uses (step.encode_batch). The default size
is the family's training size (512 px). `python -m shapes.bench --cache-sizes` prints bytes per sample:

    SD3 at 512:  latents 16x64x64 + text 333x4096 (CLIP-L/G 77 + T5 256 tokens) + pooled 2048
                 = 1,431,552 numbers = 2.86 MB in bf16, 5.73 MB in fp32
"""

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import families
import files
import flags
import models

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# -----------------------------------------------------------------------------
# Reading the pairs: a list of records (image path, [captions])


def find_coco(folder, split):
    """(captions json, image folder) of a COCO root: 2017 layout first, then 2014."""
    for year in ("2017", "2014"):
        ann = os.path.join(folder, "annotations", f"captions_{split}{year}.json")
        if os.path.exists(ann):
            return ann, os.path.join(folder, f"{split}{year}")
    return None, None


def read_coco(ann, images):
    """COCO captions json -> records. The 2014 and 2017 files have the same fields; only the file
    names differ (COCO_train2014_000000000009.jpg vs 000000000009.jpg), and they are in the json."""
    expected = 'a COCO captions file (a JSON object with "images" and "annotations")'
    coco = files.read_json(ann, expected)
    if "images" not in coco or "annotations" not in coco:
        raise files.refuse("--data", ann, expected)
    if not os.path.isdir(images):
        raise SystemExit(f"{ann}: its image folder {images} does not exist (expected next to annotations/)")
    captions = {}
    for a in coco["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    return [
        (os.path.join(images, im["file_name"]), captions[im["id"]])
        for im in sorted(coco["images"], key=lambda im: im["id"])
        if im["id"] in captions
    ]


def json_lines(path, expected):
    """(line number, object) for every non-empty line of a JSONL file; a line that is not a JSON object is
    a one-line error naming the file, the line and what each line should hold (`expected`)."""
    return files.read_json_lines(path, expected)


def read_jsonl(path):
    root, records = os.path.dirname(os.path.abspath(path)), []
    for n, item in json_lines(path, 'one JSON object with "image" and "caption"'):
        image = item.get("image", item.get("file_name"))
        caps = item.get("captions", item.get("caption", item.get("text")))
        if image is None or caps is None:
            raise SystemExit(f'{path}:{n}: a line needs an image ("image") and a caption ("caption")')
        records.append((os.path.join(root, image), [caps] if isinstance(caps, str) else list(caps)))
    return records


def read_folder(folder):
    records = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        text = os.path.join(folder, stem + ".txt")
        if ext.lower() in IMAGE_EXTS and os.path.exists(text):
            with open(text) as f:
                caps = [c.strip() for c in f if c.strip()]
            if caps:
                records.append((os.path.join(folder, name), caps))
    return records


def read_records(path, split="train"):
    """Records of a COCO root / captions json / JSONL file / image+txt folder; one-line errors."""
    if not os.path.exists(path):
        raise SystemExit(f"--data {path}: no such file or folder")
    if os.path.isdir(path):
        ann, images = find_coco(path, split)
        records = read_coco(ann, images) if ann else read_folder(path)
    elif path.endswith(".json"):  # captions_train2017.json: the images are in ../train2017/
        name = os.path.basename(path)[len("captions_") : -len(".json")]
        records = read_coco(path, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), name))
    elif path.endswith(".jsonl"):
        records = read_jsonl(path)
    else:  # a token file, a checkpoint, an image ...: say what it is
        raise files.refuse("--data", path, "a COCO folder, a captions_*.json, a .jsonl or a folder of images")
    if not records and files.describe(path)[0] not in ("images", "folder"):  # a cache, a pipeline, a run ...
        raise files.refuse("--data", path, "a COCO folder, a captions_*.json, a .jsonl or a folder of images")
    if not records:
        raise SystemExit(
            f"--data {path}: found no image-caption pairs (COCO: annotations/captions_{split}2017.json; "
            f"folder: image files with same-named .txt captions)"
        )
    return records


def image_array(path, size=None):
    """uint8 (H, W, 3): the image at `path` in RGB; with `size`, its shorter side resized to `size`
    (bicubic) and centre-cropped to size x size, as the diffusers pipelines prepare an input image.
    The one image loader of the project (training data, edit.py's input, eval.py's metrics)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).copy()


def to_tensor(array):
    """uint8 (H, W, 3) -> (3, H, W) float in [-1, 1], what the VAEs take."""
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


def load_image(path, size):
    """(3, size, size) in [-1, 1]: shorter side resized to `size` (bicubic), then centre-cropped."""
    return to_tensor(image_array(path, size))


def unreadable(e):
    return e.strerror or type(e).__name__ if isinstance(e, OSError) else type(e).__name__


def read_image(path, size=None, fix="pass a PNG or JPEG"):
    """image_array with a one-line error for a missing or unreadable file (saying what to do: `fix`)."""
    if not os.path.isfile(path):
        raise SystemExit(f"cannot read the image {path} (no such file): {fix}")
    try:
        return image_array(path, size)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's ways to fail: truncated, not an image
        kind, words = files.describe(path)
        what = words if kind not in ("image", "binary") else unreadable(e)  # a token file, a text: say so
        raise SystemExit(f"cannot read the image {path} ({what}): {fix}") from None


def try_load(path, size):
    """The image as load_image gives it, or None if it cannot be read (missing, truncated, not an image)."""
    from PIL import Image

    try:
        return load_image(path, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's ways to fail
        return None


# -----------------------------------------------------------------------------
# Sources and batches


def open_source(spec, size, seed, split="train", workers=4, model=None):
    """A source is a plain dict; get_batch(source, step, rank, world, batch) reads from it. `model`: the family
    that trains on it (a cache holds one family's encodings, checked first)."""
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "cache.json")):
        return open_cache(spec, size, seed, model)
    if glob.glob(os.path.join(spec, "shard-*.bin")):
        raise SystemExit(
            f"--data {spec}: an unfinished encoding cache (no cache.json): run `python data.py cache` again"
        )
    records = read_records(spec, split)
    return dict(
        kind="files",
        spec=spec,
        records=records,
        size=size,
        seed=seed,
        bad=set(),
        pool=ThreadPoolExecutor(max(1, workers)),
        epoch=None,
    )


def epoch_order(seed, epoch, n):
    """The epoch's image permutation and one random number per image that picks its caption."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.integers(0, 2**31, n)


def slots(source, step, rank, world, batch):
    """(order, picks, first position, epoch) of this rank's images at `step`."""
    n = len(source["records"]) if source["kind"] == "files" else source["n"]
    per_epoch = n // (world * batch)
    if per_epoch == 0:
        raise SystemExit(f"the data has {n} images, fewer than one global batch ({world} ranks x {batch})")
    epoch = step // per_epoch
    if source["epoch"] is None or source["epoch"][0] != epoch:
        source["epoch"] = (epoch, *epoch_order(source["seed"], epoch, n))
    _, order, picks = source["epoch"]
    return order, picks, ((step % per_epoch) * world + rank) * batch, epoch


def get_batch(source, step, rank=0, world=1, batch=4):
    """This rank's `batch` pairs of global step `step`: {"images" (B,3,H,W) or "latents"/"hidden"/
    "pooled" (cache), "captions": [B str], "new_bad": unreadable images first met in this call}."""
    if source["kind"] == "stream":  # drawn, not read: the shapes world's stream (shapes/pairs.py)
        return dict(source["draw"](step, rank, batch), new_bad=0)
    order, picks, start, _ = slots(source, step, rank, world, batch)
    if source["kind"] == "cache":
        return cache_batch(source, order[start : start + batch], picks[order[start : start + batch]])
    records, size, bad = source["records"], source["size"], source["bad"]
    chosen = [int(i) for i in order[start : start + batch]]
    loaded = list(source["pool"].map(lambda i: None if i in bad else try_load(records[i][0], size), chosen))
    new_bad, spare = 0, start + batch
    for k in range(batch):
        while loaded[k] is None:  # slot k is unreadable: take the next spare image
            if chosen[k] not in bad:
                bad.add(chosen[k])
                new_bad += 1
                print(f"skipping unreadable image {records[chosen[k]][0]} (rank {rank})", file=sys.stderr)
            if spare >= start + batch + len(order):
                raise SystemExit(f"--data {source['spec']}: no readable image left")
            chosen[k] = int(order[spare % len(order)])
            spare += 1
            loaded[k] = None if chosen[k] in bad else try_load(records[chosen[k]][0], size)
    captions = [records[i][1][picks[i] % len(records[i][1])] for i in chosen]
    return dict(images=torch.stack(loaded), captions=captions, new_bad=new_bad)


# -----------------------------------------------------------------------------
# Encoding cache: raw shards of bf16/fp16 rows, memory-mapped
#   cache.json                   model, size, dtype, captions per image, field shapes, shard list
#   shard-00000.json             the shard's images and captions
#   shard-00000.latents.bin      (n, C, h, w)         one latent per image
#   shard-00000.hidden.bin       (n, K, tokens, d)    K captions' text features per image
#   shard-00000.pooled.bin       (n, K, p)            (families with a pooled text feature)

STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# numpy has no bf16: each number's bits are stored as an integer of its width (and viewed back)
STORE_BITS = {
    torch.bfloat16: (np.int16, torch.int16),
    torch.float16: (np.int16, torch.int16),
    torch.float32: (np.int32, torch.int32),
}


def write_cache(bb, records, out, size, captions_per_image=1, store="bf16", batch=8, shard_gb=4.0, seed=0):
    """Encode `records` once with backbone `bb` into shards under `out`; returns the cache meta.
    K = captions_per_image captions are kept per image (drawn with `seed`; all of them with K >= 5).
    Every file is written beside its place and renamed there at the end (files.staging, files.commit): a full
    disk, Ctrl-C or any stop midway leaves the previous cache in `out` whole, and its own temporary files removed."""
    with files.staging() as staged:
        return encode_cache(bb, records, out, size, captions_per_image, store, batch, shard_gb, seed, staged)


def encode_cache(bb, records, out, size, captions_per_image, store, batch, shard_gb, seed, staged):
    """write_cache's work: the shards staged in `staged`, committed, and cache.json written last."""
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    dtype, rng = STORE_DTYPES[store], np.random.default_rng(seed)
    (np_bits, torch_bits), width = STORE_BITS[dtype], dtype.itemsize
    K, fields, shards, skipped = captions_per_image, None, [], 0
    open_maps, rows, shard_rows, kept = {}, 0, 0, []

    def close_shard(open_maps, rows, kept):
        name = f"shard-{len(shards):05d}"
        field_shapes = {f: (shape, mm.filename) for f, (mm, shape) in open_maps.items()}
        for mm, _ in open_maps.values():
            mm.flush()
        del mm
        open_maps.clear()  # unmap before cutting the preallocated files to the rows written
        for shape, scratch in field_shapes.values():
            os.truncate(scratch, rows * int(np.prod(shape)) * width)
        header = files.scratch(os.path.join(out, f"{name}.json"), 0, staged)
        with open(header, "w") as fh:
            json.dump({"count": rows, "images": [r[0] for r in kept], "captions": [r[1] for r in kept]}, fh)
        shards.append({"name": name, "count": rows})

    for start in tqdm(range(0, len(records), batch), desc="encoding cache"):
        part = [(r, try_load(r[0], size)) for r in records[start : start + batch]]
        skipped += sum(im is None for _, im in part)
        part = [(r, im) for r, im in part if im is not None]
        if not part:
            continue
        caps = [
            [r[1][i % len(r[1])] for i in (range(K) if K >= len(r[1]) else rng.permutation(len(r[1]))[:K])]
            for r, _ in part
        ]
        with torch.no_grad():
            # the posterior mean: a cache holds one latent per image, so no single random draw of it
            latents = models.encode_images(bb, torch.stack([im for _, im in part]), mode=True)
            cond = models.encode_prompts(bb, [c for cs in caps for c in cs])
        pooled = cond.get("pooled_projections", cond.get("added_cond_kwargs", {}).get("text_embeds"))
        values = {"latents": latents, "hidden": cond["encoder_hidden_states"].unflatten(0, (len(part), K))}
        if pooled is not None:
            values["pooled"] = pooled.unflatten(0, (len(part), K))
        if fields is None:
            fields = {f: list(v.shape[1:]) for f, v in values.items()}
            per_image = sum(int(np.prod(s)) for s in fields.values()) * width
            shard_rows = max(1, int(shard_gb * 1e9 // per_image))
        for b, (record, _) in enumerate(part):
            if not open_maps:  # open the next shard: one preallocated file per field
                name = f"shard-{len(shards):05d}"
                open_maps = {
                    f: (
                        np.memmap(
                            shard_file(out, f"{name}.{f}.bin", shard_rows, s, width, staged),
                            np_bits,
                            "r+",
                            shape=(shard_rows, *s),
                        ),
                        s,
                    )
                    for f, s in fields.items()
                }
                rows, kept = 0, []
            for f, v in values.items():  # the numbers' bits, as integers of their width
                open_maps[f][0][rows] = v[b].to(dtype).view(torch_bits).cpu().numpy()
            kept.append((record[0], caps[b]))
            rows += 1
            if rows == shard_rows:
                close_shard(open_maps, rows, kept)
    if open_maps:
        close_shard(open_maps, rows, kept)
    meta = dict(
        model=bb.name,
        size=size,
        store=store,
        captions_per_image=K,
        fields=fields,
        shards=shards,
        images=sum(s["count"] for s in shards),
        skipped=skipped,
    )
    files.discard([os.path.join(out, "cache.json")])  # the previous cache ends here; its shards are replaced
    files.commit(staged)
    files.write_json(os.path.join(out, "cache.json"), meta)  # written last: the cache is complete
    return meta


def shard_file(out, name, rows, shape, width, staged):
    """The temporary file of one field of a shard, its space reserved (files.scratch)."""
    return files.scratch(os.path.join(out, name), rows * int(np.prod(shape)) * width, staged)


def open_cache(folder, size, seed, model=None):
    """An encoding cache, checked root cause first: the family it was encoded for (`model`), then that it is
    whole (every shard there), then its image size -- so that following one refusal's advice never meets
    another that the first could have named (an sd3 cache at 32 px for sd1.5 at 512: the family, not the size)."""
    encoded_for = files.read_json(os.path.join(folder, "cache.json"), "an encoding cache").get("model")
    if model is not None and encoded_for != model:
        raise SystemExit(
            f"--data {folder}: holds {encoded_for}'s encodings (latents and text features), not {model}'s: train "
            f"with --model {encoded_for}, or encode the images for {model} with `python data.py cache --model "
            f"{model} --data <images> --out <new cache>`"
        )
    meta = files.read_cache_meta(folder, lambda store: STORE_DTYPES[store].itemsize)  # every shard there
    if meta["size"] != size:
        raise SystemExit(
            f"cache {folder} was encoded at {meta['size']} px, training is at {size}: pass --size {meta['size']}"
        )
    maps, captions = {f: [] for f in meta["fields"]}, []
    for shard in meta["shards"]:
        for f, shape in meta["fields"].items():
            bits = STORE_BITS[STORE_DTYPES[meta["store"]]][0]
            maps[f].append(
                np.memmap(os.path.join(folder, f"{shard['name']}.{f}.bin"), bits, "r", shape=(shard["count"], *shape))
            )
        captions += files.read_json(os.path.join(folder, f"{shard['name']}.json"), "a shard header")["captions"]
    offsets = np.cumsum([0] + [s["count"] for s in meta["shards"]])
    return dict(
        kind="cache",
        meta=meta,
        maps=maps,
        offsets=offsets,
        captions=captions,
        n=int(offsets[-1]),
        seed=seed,
        epoch=None,
        dtype=STORE_DTYPES[meta["store"]],
    )


def cache_batch(source, indices, picks):
    """Rows `indices` of the cache, caption (pick mod K) of each; copies just those rows from disk."""
    K = source["meta"]["captions_per_image"]
    out = {f: [] for f in source["maps"]}
    captions = []
    for i, pick in zip(indices.tolist(), picks.tolist()):
        shard = int(np.searchsorted(source["offsets"], i, side="right") - 1)
        row, k = i - source["offsets"][shard], pick % K
        for f, maps in source["maps"].items():
            out[f].append(torch.from_numpy(np.array(maps[shard][row] if f == "latents" else maps[shard][row, k])))
        captions.append(source["captions"][i][k])
    batch = {f: torch.stack(v).view(source["dtype"]) for f, v in out.items()}
    batch.setdefault("pooled", None)
    return dict(batch, captions=captions, new_bad=0)


# -----------------------------------------------------------------------------


def build_parser():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="encode a data set once into memory-mapped shards")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True, help="COCO folder, captions_*.json, .jsonl or image+txt folder")
    c.add_argument("--out", required=True)
    c.add_argument("--split", default="train")
    c.add_argument(
        "--size",
        type=flags.POSITIVE_INT,
        default=None,
        help="image size (default: the family's training size, 512 for the real ones)",
    )
    c.add_argument(
        "--captions-per-image", type=flags.POSITIVE_INT, default=1, help="captions kept per image (COCO has 5)"
    )
    c.add_argument("--store", default="bf16", choices=list(STORE_DTYPES))
    c.add_argument("--batch", type=flags.POSITIVE_INT, default=8, help="images per encoder batch")
    c.add_argument("--shard-gb", type=flags.POSITIVE_FLOAT, default=4.0, help="GB per shard")
    c.add_argument("--pretrained", default=None)
    c.add_argument("--seed", type=flags.SEED, default=0, help="a seed in [0, 2^63)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    facts = models.check_name(args.model)
    if models.is_shapes_world(args.model) and args.data.split(":")[0] in ("shapes", "shapes-swapped"):
        raise SystemExit(f"--data {args.data} is drawn afresh every step, not read: there is nothing to cache")
    records = read_records(args.data, args.split)  # a wrong path fails here, before loading a model
    if models.is_shapes_world(args.model):  # a cache saves a real family's large encoders; a tiny model's are small
        raise SystemExit(
            f"--model {args.model}: a cache saves running a real family's large VAE and text encoders every step; "
            f"{args.model}'s are a few MB, so there is nothing to save: train on the {len(records)} pairs as they "
            f"are, `python train.py --model {args.model} --data {args.data}` (their captions must be in the shapes "
            f"world's words, which train.py checks before it starts)"
        )
    size = args.size or facts["train_size"]  # the cache is for training: the authors' training size
    families.check_size(args.model, size)  # the one size rule of every script
    files.check_writable(args.out)  # and a place that cannot be written
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = STORE_DTYPES[args.store] if device == "cuda" else torch.float32
    bb = models.load(args.model, pretrained=args.pretrained, device=device, dtype=dtype)
    families.check_size(args.model, size, bb=bb)  # and the loaded model's positional table
    meta = write_cache(
        bb, records, args.out, size, args.captions_per_image, args.store, args.batch, args.shard_gb, args.seed
    )
    print(
        f"wrote {meta['images']} images in {len(meta['shards'])} shards to {args.out} "
        f"({meta['skipped']} unreadable skipped)"
    )


if __name__ == "__main__":
    files.script(main)  # Ctrl-C and a failing device: one line
